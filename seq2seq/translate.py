"""Decoding driver and CLI: lines in, exactly one translation per line out, in input order.

    seq2seq translate --model runs/m30k/avg [--input test.de] [--output hyp.en] [--beam 4]

Flow per chunk of ``chunk_size`` input lines (so a huge file never sits in memory): decode UTF-8
per line -> tokenize -> sort by source length -> token-budget batches -> :mod:`seq2seq.search`
-> restore input order -> detokenize -> write. An empty or whitespace-only line gives an empty
line without touching the model. A source longer than the model's ``max_positions`` (EOS
included) is truncated, with one warning at the end giving the count. Line breaks inside an
output (``\\n``, ``\\r`` and the other characters ``str.splitlines`` breaks on) become spaces.

Output length limit per sentence: ``max_len = max_len_a * source_len + max_len_b`` tokens
(source_len counts EOS; max_len counts generated tokens including EOS), capped at
``max_positions``. ``beam_size=1`` runs :func:`seq2seq.search.greedy`, which gives the same result.

``--nbest K`` writes exactly K lines per input line, ``INDEX ||| HYPOTHESIS ||| SCORE`` with a
0-based input index and the length-normalised log-probability score; missing hypotheses (an
empty input, or a search that found fewer than K) are written as empty with score ``-inf``
(``0`` for an empty input).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import torch

from seq2seq.checkpoint import CheckpointError, load_for_inference
from seq2seq.config import ConfigError, DecodeConfig
from seq2seq.search import Hypothesis, TransformerDecoder, beam_search, greedy
from seq2seq.tokenizer import EOS_ID, PAD_ID, Tokenizer

CHUNK_LINES = 10_000
# Everything str.splitlines() treats as a line boundary, mapped to a space.
_LINE_BREAKS = str.maketrans(dict.fromkeys("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029", " "))


class TranslateError(ValueError):
    """Unusable input or settings; the message names the file and line."""


@dataclass
class TranslateStats:
    """Counts for the throughput report, filled in while translating."""

    lines: int = 0
    decoded: int = 0  # non-empty lines sent to the model
    generated_tokens: int = 0  # best hypotheses' tokens, EOS included
    truncated: int = 0
    seconds: float = 0.0


def translate_lines(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    lines: Iterable[str],
    decode: DecodeConfig,
    device: str | torch.device = "cpu",
    bf16: bool = False,
) -> Iterator[str]:
    """Yield the best translation of each line, in order (an empty line for an empty one)."""
    for nbest in translate_nbest(model, tokenizer, lines, decode, device, bf16):
        yield nbest[0][0] if nbest else ""


def translate_nbest(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    lines: Iterable[str],
    decode: DecodeConfig,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    stats: TranslateStats | None = None,
    chunk_size: int = CHUNK_LINES,
) -> Iterator[list[tuple[str, float]]]:
    """Yield, per input line, up to ``decode.nbest`` ``(text, score)`` pairs, best first.

    Empty or whitespace-only lines yield ``[]``. Lines are consumed ``chunk_size`` at a time.
    When any source was truncated, one warning with the count goes to stderr at the end.
    """
    stats = TranslateStats() if stats is None else stats
    limit = model.config.max_positions - 1  # source pieces, leaving room for EOS
    iterator = iter(lines)
    while chunk := list(itertools.islice(iterator, chunk_size)):
        start = time.perf_counter()
        results: list[list[tuple[str, float]]] = [[] for _ in chunk]
        todo = [i for i, line in enumerate(chunk) if line.strip()]
        sources = tokenizer.encode_source_batch([chunk[i] for i in todo])
        stats.truncated += sum(len(ids) > limit for ids in sources)
        sources = [ids[:limit] + [EOS_ID] for ids in sources]
        for batch in token_batches([len(ids) for ids in sources], decode.batch_tokens):
            hyps = _translate_halving(model, [sources[j] for j in batch], decode, device, bf16)
            for j, nbest in zip(batch, hyps):
                results[todo[j]] = [
                    (clean_line(tokenizer.decode_target(h.tokens)), h.score) for h in nbest
                ]
                stats.generated_tokens += len(nbest[0].tokens) + 1
        stats.lines += len(chunk)
        stats.decoded += len(todo)
        stats.seconds += time.perf_counter() - start
        yield from results
    if stats.truncated:
        print(
            f"warning: {stats.truncated} input line(s) longer than {limit} source tokens were "
            f"truncated to fit the model's max_positions={limit + 1}",
            file=sys.stderr,
        )


def _translate_halving(
    model: torch.nn.Module,
    sources: list[list[int]],
    decode: DecodeConfig,
    device: str | torch.device,
    bf16: bool,
) -> list[list[Hypothesis]]:
    """``translate_ids``, retried on halves of the batch while the device runs out of memory."""
    try:
        return translate_ids(model, sources, decode, device, bf16)
    except torch.OutOfMemoryError:
        if len(sources) == 1:
            raise
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        half = len(sources) // 2
        print(
            f"warning: out of memory on a batch of {len(sources)} sentences; retrying as "
            f"{half} + {len(sources) - half}",
            file=sys.stderr,
        )
        return _translate_halving(model, sources[:half], decode, device, bf16) + (
            _translate_halving(model, sources[half:], decode, device, bf16)
        )


def token_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so that rows x longest source <= ``batch_tokens``
    (a longer single source still gets its own batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def translate_ids(
    model: torch.nn.Module,
    sources: list[list[int]],
    decode: DecodeConfig,
    device: str | torch.device = "cpu",
    bf16: bool = False,
) -> list[list[Hypothesis]]:
    """Search one batch of source ids (each ending in EOS); per source its n-best hypotheses.

    The model runs in eval mode and is put back in its previous mode afterwards.
    """
    width = max(len(ids) for ids in sources)
    src = torch.tensor([ids + [PAD_ID] * (width - len(ids)) for ids in sources], device=device)
    src_len = torch.tensor([len(ids) for ids in sources], device=device)
    max_len = (decode.max_len_a * src_len + decode.max_len_b).long()
    max_len = max_len.clamp(1, model.config.max_positions)
    autocast = (
        torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast:
            decoder = TransformerDecoder(model, src)
            settings = dict(
                max_len=max_len,
                min_len=decode.min_len,
                no_repeat_ngram_size=decode.no_repeat_ngram_size,
                length_penalty_alpha=decode.length_penalty,
            )
            if decode.beam_size == 1:
                return [[hyp] for hyp in greedy(decoder, len(sources), **settings)]
            return beam_search(
                decoder, len(sources), decode.beam_size, nbest=decode.nbest, **settings
            )
    finally:
        model.train(was_training)


def clean_line(text: str) -> str:
    """``text`` on one line: every line-break character becomes a space."""
    return text.translate(_LINE_BREAKS)


def read_utf8_lines(stream: BinaryIO, name: str, replace_invalid: bool = False) -> Iterator[str]:
    """Decode a byte stream line by line (split on ``\\n`` only; ``\\r\\n`` and a leading BOM
    are dropped).

    Raises:
        TranslateError: invalid UTF-8, naming ``name`` and the 1-based line, unless
            ``replace_invalid`` (then U+FFFD replaces the bad bytes).
    """
    for number, raw in enumerate(stream, start=1):
        raw = raw[:-1] if raw.endswith(b"\n") else raw
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            line = raw.decode("utf-8", errors="replace" if replace_invalid else "strict")
        except UnicodeDecodeError as error:
            raise TranslateError(
                f"{name}:{number}: invalid UTF-8 at byte {error.start} of the line; "
                "fix the input or pass --replace-invalid"
            ) from error
        yield line.removeprefix("\ufeff") if number == 1 else line


# ------------------------------------------------------------------------------------- CLI


# The flags that replace the model's DecodeConfig values (each argparse dest is a field name).
DECODE_FLAGS = (
    "beam_size", "length_penalty", "nbest", "max_len_a", "max_len_b", "min_len",
    "no_repeat_ngram_size", "batch_tokens",
)  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seq2seq translate",
        description="Translate one sentence per line; defaults come from the model's config.",
    )
    p.add_argument("--model", required=True, help="model directory (model.safetensors, ...)")
    p.add_argument("--input", help="source file (default: stdin)")
    p.add_argument("--output", help="output file (default: stdout)")
    p.add_argument("--beam", type=int, dest="beam_size", help="beam size (1 = greedy)")
    p.add_argument("--lenpen", type=float, dest="length_penalty", help="GNMT alpha (0 = off)")
    p.add_argument("--nbest", type=int, help="write K lines per input: INDEX ||| HYP ||| SCORE")
    p.add_argument("--max-len-a", type=float, help="max output length = a * source length + b")
    p.add_argument("--max-len-b", type=int)
    p.add_argument("--min-len", type=int, help="least tokens before EOS")
    p.add_argument("--no-repeat-ngram", type=int, dest="no_repeat_ngram_size")
    p.add_argument("--batch-tokens", type=int, help="source tokens per batch, padding included")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--bf16", action="store_true", help="autocast the model to bfloat16")
    p.add_argument("--replace-invalid", action="store_true", help="replace invalid UTF-8 bytes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        overrides = {name: getattr(args, name) for name in DECODE_FLAGS}
        model, tokenizer, config, device = load_for_inference(args.model, args.device, overrides)
        if config.model.arch != "transformer":
            raise TranslateError(f"{args.model}: a GPT model cannot translate; use seq2seq sample")
    except (CheckpointError, ConfigError, TranslateError) as error:
        print(f"seq2seq translate: error: {error}", file=sys.stderr)
        return 2
    decode = config.decode
    print(
        f"translate: {args.model} on {device}{' bf16' if args.bf16 else ''}: {decode}",
        file=sys.stderr,
    )

    stats = TranslateStats()
    with contextlib.ExitStack() as stack:
        try:
            source = stack.enter_context(open(args.input, "rb")) if args.input else sys.stdin.buffer
            if args.output:
                out = stack.enter_context(open(args.output, "w", encoding="utf-8", newline="\n"))
            else:
                out = sys.stdout
                if hasattr(out, "reconfigure"):  # never let the locale pick the output encoding
                    out.reconfigure(encoding="utf-8")
        except OSError as error:
            print(f"seq2seq translate: error: {error.filename}: {error.strerror}", file=sys.stderr)
            return 2
        lines = read_utf8_lines(source, args.input or "<stdin>", args.replace_invalid)
        results = translate_nbest(model, tokenizer, lines, decode, device, args.bf16, stats)
        try:
            for index, nbest in enumerate(results):
                if args.nbest:
                    out.write(_nbest_lines(index, nbest, decode.nbest))
                else:
                    out.write((nbest[0][0] if nbest else "") + "\n")
                if stats.lines and index + 1 == stats.lines:
                    out.flush()
        except TranslateError as error:
            out.flush()
            print(f"seq2seq translate: error: {error}", file=sys.stderr)
            return 2
    rate = stats.lines / stats.seconds if stats.seconds else 0.0
    token_rate = stats.generated_tokens / stats.seconds if stats.seconds else 0.0
    print(
        f"translate: {stats.lines} lines ({stats.decoded} non-empty) in {stats.seconds:.2f} s: "
        f"{rate:.1f} sentences/s, {token_rate:.1f} generated tokens/s",
        file=sys.stderr,
    )
    return 0


def _nbest_lines(index: int, nbest: list[tuple[str, float]], k: int) -> str:
    missing = ("", 0.0) if not nbest else ("", float("-inf"))
    rows = (nbest + [missing] * k)[:k]
    return "".join(f"{index} ||| {text} ||| {score:.4f}\n" for text, score in rows)


if __name__ == "__main__":
    sys.exit(main())
