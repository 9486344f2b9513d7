"""Scores for detokenized output: sacreBLEU's BLEU/chrF/TER and rouge-score's ROUGE; perplexity.

Never our own BLEU: every number comes from the library, with its signature, so it can be quoted.

    seq2seq evaluate --hyp hyp.en --ref test.en [--metrics bleu,chrf,ter,rouge] [--json]
    seq2seq evaluate --model runs/gpt --text input.txt              # GPT: perplexity of a text
    seq2seq evaluate --model runs/m30k --src test.de --ref test.en  # Transformer: of references

``refs`` follow sacreBLEU: a list of reference *streams*, each holding one reference per
hypothesis (``refs[j][i]`` is reference ``j`` of sentence ``i``).

Nothing to score is an error, not a number: two empty files (sacreBLEU's BLEU of no sentences
is undefined), a hypothesis file whose line count differs from a reference's (an empty one
included), an empty ``--metrics`` list, or a perplexity over empty files. Each gives one line on
stderr naming the files or the option, exit status 2.

``--model`` shows a progress bar on stderr (sentences or tokens scored, rate, time left) when
stderr is a terminal, and nothing more than the result otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF, TER
from tqdm import tqdm

from seq2seq.textio import iter_lines

METRICS = ("bleu", "chrf", "ter", "rouge")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


class EvaluateError(ValueError):
    """Inputs that cannot be scored; the message names the files and the problem."""


def score(
    hyps: Sequence[str],
    refs: Sequence[Sequence[str]],
    metrics: Sequence[str] = ("bleu", "chrf", "ter"),
    lowercase: bool = False,
) -> dict[str, dict[str, float | str]]:
    """Corpus-level scores of ``hyps`` against one or more reference streams.

    Returns ``{name: {"score": float, "signature": str, "text": str}}``. BLEU, chrF and TER come
    from ``sacrebleu.metrics``; ``lowercase`` applies to all three (TER's ``case_sensitive`` is its
    negation, so by default TER is case-sensitive here, unlike sacreBLEU's own default).
    ``"rouge"`` adds ROUGE-1/2/L/Lsum: the mean per-sentence F1 x 100 with Porter stemming; with
    several references a sentence takes its best-F1 reference per ROUGE variant. rouge-score
    lowercases and keeps only ``[a-z0-9]`` tokens, so it suits English output. For ROUGE-Lsum,
    sentences are split after ``.!?`` and whitespace.

    Raises:
        EvaluateError: an unknown metric, no references, or streams of different lengths.
    """
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise EvaluateError(f"unknown metric(s) {unknown}; known: {list(METRICS)}")
    if not metrics:
        raise EvaluateError(f"no metric given; known: {list(METRICS)}")
    if not refs:
        raise EvaluateError("no reference stream given")
    if not hyps:
        raise EvaluateError("nothing to score: no hypotheses (and no references)")
    for j, stream in enumerate(refs):
        if len(stream) != len(hyps):
            raise EvaluateError(f"reference stream {j} has {len(stream)} lines, hyps {len(hyps)}")
    hyps, refs = list(hyps), [list(stream) for stream in refs]
    sacre = {
        "bleu": lambda: BLEU(lowercase=lowercase),
        "chrf": lambda: CHRF(lowercase=lowercase),
        "ter": lambda: TER(case_sensitive=not lowercase),
    }
    results: dict[str, dict[str, float | str]] = {}
    for name in metrics:
        if name in sacre:
            metric = sacre[name]()
            result = metric.corpus_score(hyps, refs)
            signature = str(metric.get_signature())
            results[name] = {"score": result.score, "signature": signature, "text": str(result)}
        else:
            results.update(rouge(hyps, refs))
    return results


def rouge(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> dict[str, dict[str, float | str]]:
    """ROUGE-1/2/L/Lsum F1 x 100 averaged over sentences (see :func:`score`)."""
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for i, hyp in enumerate(hyps):
        targets = [_split_sentences(stream[i]) for stream in refs]
        scores = scorer.score_multi(targets, _split_sentences(hyp))
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    signature = f"rouge_score|stem:yes|refs:{len(refs)}|multi:max-f1|lsum-split:.!?"
    out: dict[str, dict[str, float | str]] = {}
    for key in ROUGE_KEYS:
        value = 100.0 * totals[key] / max(len(hyps), 1)
        out[key] = {"score": value, "signature": signature, "text": f"{key} F1 = {value:.2f}"}
    return out


def _split_sentences(text: str) -> str:
    # rougeLsum treats newlines as sentence boundaries; other keys ignore them.
    return _SENTENCE_END.sub("\n", text.strip())


# ------------------------------------------------------------------------------ perplexity


@torch.inference_mode()
def perplexity_lm(
    model: torch.nn.Module, ids: Sequence[int], device: str = "cpu", progress: bool = False
) -> dict:
    """Perplexity of a ``GPT`` on one token stream, in non-overlapping windows of
    ``max_positions`` inputs (each window starts without earlier context); ``progress`` shows
    a bar of tokens scored on stderr."""
    window = model.config.max_positions
    stream = torch.tensor(list(ids), dtype=torch.long)
    if stream.numel() < 2:
        raise EvaluateError("the text needs at least two tokens")
    total, count = 0.0, 0
    bar = tqdm(total=stream.numel() - 1, desc="perplexity", unit=" tok", file=sys.stderr,
               disable=not progress)  # fmt: skip
    with bar:
        for start in range(0, stream.numel() - 1, window):
            chunk = stream[start : start + window + 1].to(device)[None]
            logits = model(chunk[:, :-1]).float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total, count = total + float(loss), count + chunk.size(1) - 1
            bar.update(chunk.size(1) - 1)
    return {"tokens": count, "nll": total / count, "perplexity": math.exp(total / count)}


@torch.inference_mode()
def perplexity_seq2seq(
    model: torch.nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    device: str = "cpu",
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Teacher-forced perplexity of target pieces (+EOS) given source pieces (+EOS); ``progress``
    shows a bar of sentences scored on stderr."""
    from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID

    if not pairs:
        raise EvaluateError("nothing to score: no sentence pairs")
    limit = model.config.max_positions
    total, count = 0.0, 0
    bar = tqdm(total=len(pairs), desc="perplexity", unit=" sent", file=sys.stderr,
               disable=not progress)  # fmt: skip
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        src = [(s[: limit - 1] + [EOS_ID]) for s, _ in chunk]
        tgt = [t[: limit - 1] for _, t in chunk]
        src_t = _pad(src, PAD_ID).to(device)
        tgt_in = _pad([[BOS_ID] + t for t in tgt], PAD_ID).to(device)
        tgt_out = _pad([t + [EOS_ID] for t in tgt], PAD_ID).to(device)
        logits = model(src_t, tgt_in).float()
        loss = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), tgt_out.flatten(), ignore_index=PAD_ID, reduction="sum"
        )
        total += float(loss)
        count += int((tgt_out != PAD_ID).sum())
        bar.update(len(chunk))
    bar.close()
    return {"tokens": count, "nll": total / count, "perplexity": math.exp(total / count)}


def _pad(rows: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(row) for row in rows)
    return torch.tensor([row + [pad] * (width - len(row)) for row in rows], dtype=torch.long)


# ------------------------------------------------------------------------------------- CLI


def read_lines(path: str | Path) -> list[str]:
    """The lines of a UTF-8 file (plain or ``.gz``) without their line endings, read as every
    command reads text (:func:`seq2seq.textio.iter_lines`).

    Raises:
        EvaluateError: an unreadable file, or invalid UTF-8 (naming ``path:line``).
    """
    return list(iter_lines(path, error=EvaluateError))


def read_aligned(source_path: str | Path, target_path: str | Path) -> tuple[list[str], list[str]]:
    """The lines of two files that pair up line by line (sources and their references).

    Raises:
        EvaluateError: an unreadable file, different line counts, or both files empty.
    """
    sources, targets = read_lines(source_path), read_lines(target_path)
    if len(sources) != len(targets):
        raise EvaluateError(
            f"line counts differ: {source_path} has {len(sources)} lines, "
            f"{target_path} has {len(targets)}"
        )
    if not sources:
        raise EvaluateError(f"nothing to score: {source_path} and {target_path} are empty")
    return sources, targets


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="seq2seq evaluate",
        description="Score hypotheses with sacreBLEU/ROUGE, or a model's perplexity on text.",
    )
    parser.add_argument("--hyp", help="hypotheses, one per line (detokenized)")
    parser.add_argument("--ref", nargs="+", help="reference file(s); with --model: the targets")
    parser.add_argument(
        "--metrics", default="bleu,chrf,ter", help="comma list of " + ",".join(METRICS)
    )
    parser.add_argument("--lowercase", action="store_true", help="case-insensitive BLEU/chrF/TER")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--model", help="model directory (perplexity mode)")
    parser.add_argument("--text", help="with a GPT --model: plain text to score")
    parser.add_argument("--src", help="with a Transformer --model: sources aligned with --ref")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.model:
            results = _perplexity_cli(args)
        else:
            if not args.hyp or not args.ref:
                parser.error("--hyp and --ref are required (or --model for perplexity)")
            results = _score_cli(args)
    except EvaluateError as error:
        print(f"seq2seq evaluate: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False))
    else:
        for result in results.values():
            print("\t".join(str(result[key]) for key in ("text", "signature") if key in result))
    return 0


def _score_cli(args: argparse.Namespace) -> dict:
    hyps = read_lines(args.hyp)
    refs = [read_lines(path) for path in args.ref]
    for path, stream in zip(args.ref, refs):
        if len(stream) != len(hyps):
            raise EvaluateError(
                f"line counts differ: {args.hyp} has {len(hyps)} lines, {path} has {len(stream)}"
            )
    metrics = [name.strip() for name in args.metrics.split(",") if name.strip()]
    unknown = [name for name in metrics if name not in METRICS]
    if unknown or not metrics:
        raise EvaluateError(
            f"--metrics {args.metrics!r}: "
            + (f"unknown metric {unknown[0]!r}" if unknown else "no metric given")
            + f"; choose from {','.join(METRICS)}"
        )
    if not hyps:
        raise EvaluateError(f"nothing to score: {args.hyp} and {', '.join(args.ref)} are empty")
    return score(hyps, refs, metrics, lowercase=args.lowercase)


def _perplexity_cli(args: argparse.Namespace) -> dict:
    from seq2seq.checkpoint import CheckpointError, load_model
    from seq2seq.hardware import resolve_device

    try:
        device = str(resolve_device(args.device))
    except ValueError as error:
        raise EvaluateError(f"--device: {error}") from None
    try:
        model, tokenizer, config = load_model(args.model, device=device)
    except CheckpointError as error:
        raise EvaluateError(str(error)) from error
    if config.model.arch in ("gpt", "bigram"):
        if not args.text:
            raise EvaluateError("a GPT model needs --text FILE")
        text = "\n".join(read_lines(args.text)) + "\n"
        ids = tokenizer.encode_target(text)
        if len(ids) < 2:
            raise EvaluateError(f"{args.text}: too short to score (needs at least two tokens)")
        result = perplexity_lm(model, ids, device, progress=sys.stderr.isatty())
    else:
        if not (args.src and args.ref and len(args.ref) == 1):
            raise EvaluateError("a Transformer model needs --src FILE and one --ref FILE")
        sources, targets = read_aligned(args.src, args.ref[0])
        pairs = list(
            zip(tokenizer.encode_source_batch(sources), tokenizer.encode_target_batch(targets))
        )
        result = perplexity_seq2seq(model, pairs, device, progress=sys.stderr.isatty())
    result["text"] = (
        f"perplexity = {result['perplexity']:.3f} (nll {result['nll']:.4f} nats/token, "
        f"{result['tokens']} tokens)"
    )
    return {"perplexity": result}


if __name__ == "__main__":
    sys.exit(main())
