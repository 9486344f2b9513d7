"""Text generation from a decoder-only GPT model directory, with the KV cache.

    seq2seq sample --model runs/shakespeare [--prompt "ROMEO:"] [--max-new-tokens 500]
                   [--temperature 0.8] [--top-k 200] [--top-p 0.95] [--seed 1]

The prompt comes from ``--prompt`` or else from stdin; an empty prompt starts from a newline (the
language-model stream has no BOS) or, if the vocabulary has no newline, from BOS. The model never
sees more than ``max_positions`` tokens: when the context would overflow, decoding restarts (a
fresh cache) from the last ``max_positions // 2`` tokens, so generation can run past the model's
length. Prints the prompt followed by the continuation; a fixed ``--seed`` gives the same text.

A prompt read from stdin follows ``translate``'s rule: invalid UTF-8 is an error naming
``<stdin>:LINE``, unless ``--replace-invalid`` (then U+FFFD replaces the bad bytes). Exit status
as ``translate``'s: 0 done, 2 bad input or settings, 1 stdout closed early.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import torch

from seq2seq.checkpoint import CheckpointError, load_for_inference
from seq2seq.config import ConfigError, DecodeConfig
from seq2seq.hardware import resolve_sampling_precision
from seq2seq.kernels import prepare_cpu_decoding
from seq2seq.search import GPTDecoder, sample
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer
from seq2seq.translate import (
    SAMPLING_RULES,
    TranslateError,
    add_precision_flags,
    check_decode_flags,
    resolve_cli_device,
    seeded_generator,
    stdout_closed,
)

# The language-model stream is raw text: padding, BOS and EOS never occur in it.
NEVER_SAMPLED = (PAD_ID, BOS_ID, EOS_ID)


class SampleError(ValueError):
    """Unusable model directory or settings."""


@torch.inference_mode()
def generate_ids(
    model: torch.nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> list[int]:
    """Continue ``prompt`` (at least one id) by ``max_new_tokens`` ids, never PAD/BOS/EOS; see
    the module docstring for how the context is windowed."""
    if not prompt:
        raise SampleError("the prompt needs at least one token")
    limit = model.config.max_positions
    tokens = list(prompt)
    start = max(0, len(tokens) - limit)
    was_training = model.training
    model.eval()
    try:
        while len(tokens) - len(prompt) < max_new_tokens:
            if len(tokens) - start > limit:
                start = len(tokens) - limit // 2
            window = torch.tensor([tokens[start:]], device=device)
            # The window's last token plus n - 1 sampled ones are fed: len(window) - 1 + n <= limit.
            n = min(max_new_tokens - (len(tokens) - len(prompt)), limit - window.size(1) + 1)
            decoder = GPTDecoder(model, window)
            new = sample(
                decoder, window[:, -1], n, temperature, top_k, top_p, generator,
                blocked_ids=NEVER_SAMPLED,
            )  # fmt: skip
            tokens += new[0]
    finally:
        model.train(was_training)
    return tokens[len(prompt) :]


def generate(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompt: str,
    decode: DecodeConfig,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> str:
    """The prompt (as the tokenizer reads it back) followed by ``decode.max_new_tokens`` sampled
    tokens, using ``decode``'s temperature, top-k and top-p, under autocast to ``dtype`` when
    given (None: full precision)."""
    prompt_ids = tokenizer.encode_target(prompt) if prompt else []
    seed_ids = prompt_ids or start_ids(tokenizer)
    generator = seeded_generator(seed, device)
    autocast = (
        torch.autocast(torch.device(device).type, dtype=dtype)
        if dtype is not None
        else contextlib.nullcontext()
    )
    with autocast:
        new = generate_ids(
            model, seed_ids, decode.max_new_tokens, decode.temperature, decode.top_k,
            decode.top_p, generator, device,
        )  # fmt: skip
    return tokenizer.decode_target(prompt_ids + new)


def start_ids(tokenizer: Tokenizer) -> list[int]:
    """What an empty prompt starts from: a newline if the vocabulary has one, else BOS."""
    ids = tokenizer.encode_target("\n")
    return ids if ids and UNK_ID not in ids else [BOS_ID]


# The flags that replace the model's DecodeConfig values (each argparse dest is a field name).
DECODE_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p")
# Checked on the merged settings, naming the flag (or the model's config key); see translate.
DECODE_RULES = {
    "max_new_tokens": ("--max-new-tokens", lambda v: v >= 0, "an integer >= 0"),
    **SAMPLING_RULES,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seq2seq sample",
        description="Generate text from a GPT model directory.",
        epilog="Exit status: 0 done; 2 bad input or settings; 1 stdout closed early (| head).",
    )
    p.add_argument("--model", required=True, help="model directory of a GPT (arch: gpt)")
    p.add_argument("--prompt", help="text to continue (default: read stdin)")
    p.add_argument("--max-new-tokens", type=int, help="tokens to generate")
    p.add_argument("--temperature", type=float, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, help="keep the k most probable tokens (0 = all)")
    p.add_argument("--top-p", type=float, help="nucleus: keep the smallest set with mass >= p")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    add_precision_flags(p)
    p.add_argument(
        "--replace-invalid", action="store_true", help="replace invalid UTF-8 bytes on stdin"
    )
    return p


def read_prompt(stream, name: str, replace_invalid: bool = False) -> str:
    """The whole of ``stream`` as text, with ``translate``'s rule for invalid UTF-8.

    Raises:
        SampleError: invalid UTF-8, naming ``name`` and the 1-based line, unless
            ``replace_invalid``.
    """
    raw = stream.buffer.read() if hasattr(stream, "buffer") else stream.read()
    if isinstance(raw, str):  # a text stream without bytes underneath (tests, notebooks)
        return raw
    try:
        return raw.decode("utf-8", errors="replace" if replace_invalid else "strict")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1)
        raise SampleError(
            f"{name}:{line}: invalid UTF-8 at byte {column} of the line; "
            "fix the input or pass --replace-invalid"
        ) from error


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        device, precision, requested = resolve_cli_device(args)
        if args.prompt is not None and not _encodable(args.prompt):
            raise SampleError("--prompt: invalid UTF-8 in the argument")
        overrides = {name: getattr(args, name) for name in DECODE_FLAGS}
        model, tokenizer, config, _ = check_decode_flags(
            overrides,
            lambda: load_for_inference(args.model, str(device), overrides),
            args.model,
            DECODE_RULES,
        )
        if config.model.arch != "gpt":
            raise SampleError(f"{args.model}: not a GPT model; use seq2seq translate")
        prepare_cpu_decoding(model)  # on the CPU, each new token's step as one graph
        decode = config.decode
        precision = resolve_sampling_precision(requested, device)
        if args.prompt is not None:
            prompt = args.prompt
        else:
            prompt = read_prompt(sys.stdin, "<stdin>", args.replace_invalid)
    except (CheckpointError, ConfigError, SampleError, TranslateError) as error:
        print(f"seq2seq sample: error: {error}", file=sys.stderr)
        return 2
    print(
        f"sample: {args.model} on {device}, seed {args.seed}: max_new_tokens="
        f"{decode.max_new_tokens} temperature={decode.temperature} top_k={decode.top_k} "
        f"top_p={decode.top_p}",
        file=sys.stderr,
    )
    print(f"sample: {precision.describe(requested)}", file=sys.stderr)
    start = time.perf_counter()
    text = generate(model, tokenizer, prompt, decode, args.seed, device, precision.dtype)
    seconds = time.perf_counter() - start
    try:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        return stdout_closed("sample")
    rate = decode.max_new_tokens / seconds if seconds else 0.0
    print(f"sample: {decode.max_new_tokens} tokens in {seconds:.2f} s ({rate:.1f} tokens/s)",
          file=sys.stderr)  # fmt: skip
    return 0


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable argv bytes arrive as lone surrogates
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
