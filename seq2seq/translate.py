"""Decoding driver and CLI: lines in, exactly one translation per line out, in input order.

    seq2seq translate --model runs/m30k/avg [--input test.de] [--output hyp.en] [--beam 4]

Per chunk of input lines (a huge file never sits in memory), :mod:`seq2seq.decoding` tokenizes,
sorts by length, searches token-budget batches, restores input order and detokenizes (it also
holds the length limit ``max_len_a * source_len + max_len_b``, shared with ``Translator`` and
validation BLEU). An empty or whitespace-only line gives an empty line without touching the
model. A source longer than ``max_positions`` (EOS included) is truncated, with one warning at
the end giving the count. Line breaks inside an output (``\\n``, ``\\r`` and the other
characters ``str.splitlines`` breaks on) become spaces.

Input from stdin (a terminal or a pipe: a person typing, or a program in a dialogue) is
translated one line at a time, each answer written and flushed as soon as its line arrives;
``--input FILE`` is read in chunks of ``CHUNK_LINES`` lines, sorted by length into full batches,
so translate a large corpus with ``--input`` for throughput.

``--precision auto|fp32|bf16|int8`` (default auto) picks the autocast dtype through
:func:`seq2seq.hardware.resolve_precision` and prints its choice and reason at start; ``int8
(CPU only) runs the linear layers dynamically quantized (:func:`seq2seq.decoding.quantize_int8`);
``--bf16`` is a deprecated alias for ``--precision bf16``.

``--nbest K`` writes exactly K lines per input line, ``INDEX ||| HYPOTHESIS ||| SCORE`` with a
0-based input index and the length-normalised log-probability score; missing hypotheses (an
empty input, or a search that found fewer than K) are written as empty with score ``-inf``
(``0`` for an empty input). Without ``--beam`` it widens a narrower beam of the model's config
to K, as ``Translator.translate_nbest`` does; with ``--beam`` below K it is refused.

``--sample`` draws each translation instead of searching for the best one (back-translation
wants varied sources): ``--temperature`` divides the log-probabilities, then ``--top-k`` and
``--top-p`` (nucleus) filter them, through :func:`seq2seq.search.sample` with the sampling code
``seq2seq sample`` uses; ``min_len``, ``no_repeat_ngram_size`` and the length limit apply as in
greedy search, so ``--top-k 1`` or ``--temperature 0`` is greedy. ``--seed S`` makes the draws
repeatable (same input, model, settings and device: same output); without it they differ per run.

With ``--input FILE`` and stderr a terminal, a progress bar on stderr shows the sentences done,
sentences per second and the time left; otherwise (a log file, a pipe) only the summary line is
written at the end.

``--output FILE`` is written to a temporary file beside it and renamed over FILE only once every
line is written: a failure or a kill never leaves a truncated FILE, and an existing FILE keeps its
old content until the new one is complete (it is replaced, as a shell's ``>`` would). An output
that is the input (the same file under any name: symlink, hard link) is refused before anything
is opened for writing. Exit status: 0 done, 2 bad input or settings (one line on stderr naming
the file, line or option), 1 when the reader of stdout went away early (``| head``): translation
stops quietly, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

import torch
from tqdm import tqdm

from seq2seq.checkpoint import CheckpointError, load_for_inference
from seq2seq.config import ConfigError, DecodeConfig
from seq2seq.decoding import (  # noqa: F401  (the rest are re-exported for importers of this module)
    CHUNK_LINES,
    TranslateStats,
    clean_line,
    quantize_int8,
    seeded_generator,
    token_batches,
    translate_ids,
    translate_nbest,
)
from seq2seq.hardware import PrecisionChoice, resolve_device, resolve_precision
from seq2seq.kernels import prepare_cpu_decoding
from seq2seq.textio import iter_lines
from seq2seq.tokenizer import Tokenizer


class TranslateError(ValueError):
    """Unusable input or settings; the message names the file and line."""


def translate_lines(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    lines: Iterable[str],
    decode: DecodeConfig,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    *,
    dtype: torch.dtype | None = None,
) -> Iterator[str]:
    """Yield the best translation of each line, in order (an empty line for an empty one).

    ``dtype`` is the autocast dtype (None: full precision); ``bf16=True``: deprecated bfloat16.
    """
    for nbest in translate_nbest(model, tokenizer, lines, decode, device, bf16, dtype=dtype):
        yield nbest[0][0] if nbest else ""


def read_utf8_lines(stream: BinaryIO, name: str, replace_invalid: bool = False) -> Iterator[str]:
    """Decode a byte stream line by line as it arrives (``seq2seq.textio.iter_lines``).

    Raises:
        TranslateError: invalid UTF-8, naming ``name`` and the 1-based line, unless
            ``replace_invalid`` (then U+FFFD replaces the bad bytes).
    """
    return iter_lines(
        stream,
        name,
        error=TranslateError,
        replace_invalid=replace_invalid,
        hint="; fix the input or pass --replace-invalid",
    )


# ------------------------------------------------------------------------------------- CLI


# The flags that replace the model's DecodeConfig values (each argparse dest is a field name).
DECODE_FLAGS = (
    "beam_size", "length_penalty", "nbest", "max_len_a", "max_len_b", "min_len",
    "no_repeat_ngram_size", "batch_tokens", "temperature", "top_k", "top_p",
)  # fmt: skip


# DecodeConfig field -> (flag, whether a value is allowed, what is required); checked on the
# merged settings, so a bad value in the model's config.yaml is caught as well as a bad flag.
DECODE_RULES = {
    "beam_size": ("--beam", lambda v: v >= 1, "an integer >= 1"),
    "length_penalty": ("--lenpen", math.isfinite, "a finite number"),
    "nbest": ("--nbest", lambda v: v >= 1, "an integer >= 1"),
    "max_len_a": ("--max-len-a", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "max_len_b": ("--max-len-b", lambda v: v >= 0, "an integer >= 0"),
    "min_len": ("--min-len", lambda v: v >= 0, "an integer >= 0"),
    "no_repeat_ngram_size": ("--no-repeat-ngram", lambda v: v >= 0, "an integer >= 0"),
    "batch_tokens": ("--batch-tokens", lambda v: v >= 1, "an integer >= 1"),
}


# The sampling settings, shared with seq2seq sample; translate checks them only with --sample.
SAMPLING_RULES = {
    "temperature": (
        "--temperature",
        lambda v: math.isfinite(v) and v >= 0,
        "a finite number >= 0 (0 = greedy)",
    ),
    "top_k": ("--top-k", lambda v: v >= 0, "an integer >= 0 (0 = all)"),
    "top_p": ("--top-p", lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
}


def check_settings(values: dict[str, Any], rules: dict, where: str | None = None) -> None:
    """Raise TranslateError for the first value ``rules`` reject (None values are not given).

    The message names the value's flag, or ``decode.<field> in <where>`` when ``where`` (the
    model directory) is given, for a value that came from the model's config.
    """
    for name, (flag, allowed, requirement) in rules.items():
        value = values.get(name)
        if value is not None and not allowed(value):
            label = f"decode.{name} in {where}" if where else flag
            raise TranslateError(f"{label} must be {requirement}, got {value}")


def check_decode_flags(
    overrides: dict[str, Any], load: Callable[[], tuple], model_dir: str, rules: dict
) -> tuple:
    """Check the flags' values, run ``load`` (``load_for_inference``), then check the settings
    that came from the model's config; returns what ``load`` returned."""
    check_settings(overrides, rules)
    loaded = load()
    decode = loaded[2].decode
    given = {name for name, value in overrides.items() if value is not None}
    from_config = {f: getattr(decode, f) for f in rules if f not in given}
    check_settings(from_config, rules, model_dir)
    return loaded


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="seq2seq translate",
        description="Translate one sentence per line; defaults come from the model's config.",
        epilog="Exit status: 0 done; 2 bad input or settings; 1 stdout closed early (| head).",
    )
    p.add_argument("--model", required=True, help="model directory (model.safetensors, ...)")
    p.add_argument("--input", help="source file (default: stdin)")
    p.add_argument(
        "--output",
        help="output file (default: stdout); written beside and renamed when complete, so an "
        "existing file is replaced only by a whole new one; the input itself is refused",
    )
    p.add_argument("--beam", type=int, dest="beam_size", help="beam size (1 = greedy)")
    p.add_argument("--lenpen", type=float, dest="length_penalty", help="GNMT alpha (0 = off)")
    p.add_argument("--nbest", type=int, help="write K lines per input: INDEX ||| HYP ||| SCORE")
    p.add_argument("--max-len-a", type=float, help="max output length = a * source length + b")
    p.add_argument("--max-len-b", type=int)
    p.add_argument("--min-len", type=int, help="least tokens before EOS")
    p.add_argument("--no-repeat-ngram", type=int, dest="no_repeat_ngram_size")
    p.add_argument("--batch-tokens", type=int, help="source tokens per batch, padding included")
    p.add_argument(
        "--sample", action="store_true", help="draw each translation (e.g. back-translation)"
    )
    p.add_argument(
        "--temperature", type=float, help="with --sample: softmax temperature; 0 = greedy"
    )
    p.add_argument("--top-k", type=int, help="with --sample: keep the k most probable (0 = all)")
    p.add_argument("--top-p", type=float, help="with --sample: nucleus mass to keep, in (0, 1]")
    p.add_argument("--seed", type=int, help="with --sample: random seed (default: random)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    add_precision_flags(p, int8=True)
    p.add_argument("--replace-invalid", action="store_true", help="replace invalid UTF-8 bytes")
    return p


def add_precision_flags(p: argparse.ArgumentParser, int8: bool = False) -> None:
    """``--precision auto|fp32|bf16`` (``|int8`` with ``int8``) and the deprecated ``--bf16``."""
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "int8") if int8 else ("auto", "fp32", "bf16"),
        default=None,
        help="autocast precision (default auto: bf16 where the hardware runs it natively)",
    )
    p.add_argument("--bf16", action="store_true", help="deprecated: same as --precision bf16")


def resolve_cli_device(args: argparse.Namespace) -> tuple[torch.device, PrecisionChoice, str]:
    """``--device`` and ``--precision``/``--bf16`` resolved: (device, choice, requested name).

    Raises:
        TranslateError: an unknown or absent device, or contradicting precision flags.
    """
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        raise TranslateError(f"--device: {error}") from None
    if args.bf16 and args.precision not in (None, "bf16"):
        raise TranslateError(f"--bf16 contradicts --precision {args.precision}")
    requested = "bf16" if args.bf16 else (args.precision or "auto")
    if requested == "int8":
        if device.type != "cpu":
            raise TranslateError(f"--precision int8 runs on the CPU only, not on --device {device}")
        return device, PrecisionChoice("fp32", "linear layers dynamically quantized"), requested
    try:
        return device, resolve_precision(requested, device), requested
    except ValueError as error:
        raise TranslateError(f"--precision: {error}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        device, precision, requested = resolve_cli_device(args)
        output = _output_path(args.input, args.output)
        overrides = {name: getattr(args, name) for name in DECODE_FLAGS}
        _check_sampling_flags(args)
        if args.sample:
            # One draw per line: the model's beam and n-best settings do not apply.
            overrides.update(beam_size=1, nbest=1)
        rules = {**DECODE_RULES, **SAMPLING_RULES} if args.sample else DECODE_RULES
        widen = _check_nbest_flags(args)
        loaded_with = {**overrides, "nbest": None} if widen else overrides
        model, tokenizer, config, _ = check_decode_flags(
            overrides,
            lambda: load_for_inference(args.model, str(device), loaded_with),
            args.model,
            rules,
        )
        if widen:
            beam = max(config.decode.beam_size, args.nbest)
            if beam > config.decode.beam_size:
                print(
                    f"translate: --nbest {args.nbest} widens the model's beam "
                    f"{config.decode.beam_size} to {beam}",
                    file=sys.stderr,
                )
            decode = dataclasses.replace(config.decode, beam_size=beam, nbest=args.nbest)
            decode.validate()
            config = dataclasses.replace(config, decode=decode)
        if config.model.arch != "transformer":
            raise TranslateError(f"{args.model}: a GPT model cannot translate; use seq2seq sample")
    except (CheckpointError, ConfigError, TranslateError) as error:
        print(f"seq2seq translate: error: {error}", file=sys.stderr)
        return 2
    decode = config.decode
    sampler = seeded_generator(args.seed, device) if args.sample else None
    print(f"translate: {args.model} on {device}: {decode}", file=sys.stderr)
    if args.sample:
        print(
            f"translate: sampling with temperature={decode.temperature} top_k={decode.top_k} "
            f"top_p={decode.top_p}, seed {args.seed}",
            file=sys.stderr,
        )
    if requested == "int8":
        model = quantize_int8(model, device)
        print(f"translate: precision: int8 ({precision.reason})", file=sys.stderr)
    else:
        print(f"translate: {precision.describe(requested)}", file=sys.stderr)
    prepare_cpu_decoding(model)

    stats = TranslateStats()
    with contextlib.ExitStack() as stack:
        try:
            source = stack.enter_context(open(args.input, "rb")) if args.input else sys.stdin.buffer
            if output is None:
                out = sys.stdout
                if hasattr(out, "reconfigure"):  # never let the locale pick the output encoding
                    out.reconfigure(encoding="utf-8")
            else:
                replaced = stack.enter_context(ReplacedFile(output))
                out = replaced.handle
        except OSError as error:
            print(f"seq2seq translate: error: {error.filename}: {error.strerror}", file=sys.stderr)
            return 2
        lines = read_utf8_lines(source, args.input or "<stdin>", args.replace_invalid)
        show = bool(args.input) and sys.stderr.isatty()  # a log or a pipe gets the summary only
        total = count_lines(args.input) if show else None
        bar = tqdm(total=total, desc="translate", unit=" sent", file=sys.stderr, disable=not show)
        stack.enter_context(bar)
        # stdin may be a person or a program waiting for each answer: one line per chunk.
        chunk_size = CHUNK_LINES if args.input else 1
        results = translate_nbest(
            model, tokenizer, lines, decode, device, stats=stats, chunk_size=chunk_size,
            dtype=precision.dtype, sampler=sampler, progress=bar.update,
        )  # fmt: skip
        try:
            for index, nbest in enumerate(results):
                if args.nbest:
                    out.write(_nbest_lines(index, nbest, decode.nbest))
                else:
                    out.write((nbest[0][0] if nbest else "") + "\n")
                if stats.lines and index + 1 == stats.lines:
                    out.flush()
            if output is None:
                out.flush()
            else:
                replaced.commit()
        except TranslateError as error:
            if output is None:
                with contextlib.suppress(BrokenPipeError):
                    out.flush()
            print(f"seq2seq translate: error: {error}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            return stdout_closed("translate")
        except OSError as error:  # e.g. a full disk while writing --output
            print(f"seq2seq translate: error: {output}: {error.strerror}", file=sys.stderr)
            return 2
    rate = stats.lines / stats.seconds if stats.seconds else 0.0
    token_rate = stats.generated_tokens / stats.seconds if stats.seconds else 0.0
    print(
        f"translate: {stats.lines} lines ({stats.decoded} non-empty) in {stats.seconds:.2f} s: "
        f"{rate:.1f} sentences/s, {token_rate:.1f} generated tokens/s",
        file=sys.stderr,
    )
    return 0


def _check_nbest_flags(args: argparse.Namespace) -> bool:
    """Whether ``--nbest`` came without ``--beam`` (the beam then widens to it once the model's
    config is read); ``--nbest`` above ``--beam`` is refused."""
    if args.nbest is None or args.sample:
        return False
    if args.beam_size is None:
        return True
    if args.nbest > args.beam_size >= 1:
        raise TranslateError(
            f"--nbest {args.nbest} exceeds --beam {args.beam_size}: a beam of B keeps at most B "
            f"hypotheses"
        )
    return False


def _check_sampling_flags(args: argparse.Namespace) -> None:
    """Sampling flags only with ``--sample``, and ``--sample`` without the search's beam/n-best."""
    if args.sample:
        if args.beam_size not in (None, 1):
            raise TranslateError(
                f"--beam {args.beam_size} contradicts --sample (one draw per line)"
            )
        if args.nbest is not None:
            raise TranslateError("--nbest needs beam search; --sample draws one line per line")
        return
    given = (
        ("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p),
        ("--seed", args.seed),
    )  # fmt: skip
    for flag, value in given:
        if value is not None:
            raise TranslateError(f"{flag} needs --sample (beam search and greedy do not draw)")


def count_lines(path: str) -> int:
    """Lines in a file, a last one without ``\\n`` included (for a progress bar's total)."""
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            count, last = count + block.count(b"\n"), block[-1:]
    return count + (last != b"\n")


def _output_path(input_path: str | None, output: str | None) -> str | None:
    """The file to replace (symlinks followed), after refusing one that is the input."""
    if output is None:
        return None
    if os.path.isdir(output):
        raise TranslateError(f"--output {output}: is a directory")
    if input_path and os.path.exists(input_path) and os.path.exists(output):
        if os.path.samefile(input_path, output):
            raise TranslateError(
                f"--output {output} is the input {input_path}: refusing to overwrite the input"
            )
    return os.path.realpath(output)


class ReplacedFile:
    """A UTF-8 text file written under a temporary name beside ``path`` and renamed over it by
    :meth:`commit`; leaving the ``with`` block without committing removes the temporary file, so
    ``path`` only ever holds its old content or the complete new one.

    A ``path`` that is not a regular file (``/dev/null``, a FIFO, a terminal) is written into
    directly: renaming over it would replace the device or pipe itself."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.committed = False
        if os.path.exists(path) and not os.path.isfile(path):
            self.tmp = None
            self.handle = open(path, "w", encoding="utf-8", newline="\n")
            return
        directory, name = os.path.split(path)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=directory or ".")
        mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)  # mkstemp makes it private; an output follows the umask
        self.handle = open(fd, "w", encoding="utf-8", newline="\n")

    def commit(self) -> None:
        if self.tmp is None:
            self.handle.close()
            self.committed = True
            return
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        os.replace(self.tmp, self.path)
        self.committed = True

    def __enter__(self) -> ReplacedFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self.committed:
            with contextlib.suppress(OSError):
                self.handle.close()
            if self.tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.tmp)


def stdout_closed(command: str) -> int:
    """The reader of stdout went away: stop without a traceback (the documented exit 1)."""
    # Python flushes stdout again at exit; point it at /dev/null so that flush cannot fail.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    print(f"{command}: stdout closed early; stopped", file=sys.stderr)
    return 1


def _nbest_lines(index: int, nbest: list[tuple[str, float]], k: int) -> str:
    missing = ("", 0.0) if not nbest else ("", float("-inf"))
    rows = (nbest + [missing] * k)[:k]
    return "".join(f"{index} ||| {text} ||| {score:.4f}\n" for text, score in rows)


if __name__ == "__main__":
    sys.exit(main())
