"""Decoding speed, memory and agreement: our search against Hugging Face ``generate``, same weights.

    python benchmarks/bench_decode.py --model runs/multi30k/avg
    python benchmarks/bench_decode.py                  # trains a quick model first (cached)

The 1,000 German sentences of Multi30k test_2016_flickr are tokenized once, sorted by length and
cut into batches of 64 sentences; each batch goes through our ``seq2seq.translate.translate_ids``
(encoder once, cached decoder, batched beam search of ``seq2seq.search``) and through
``MarianMTModel.generate`` of ``seq2seq.export.to_marian(model)``: the same network and weights,
saved once with ``save_pretrained`` and loaded with ``from_pretrained`` as a Hugging Face user
would. Each (implementation, beam, precision, repeat) runs in its own process; ours and Hugging
Face alternate and the fastest of ``--repeats`` is kept. Its peak RSS ("max RSS") is Linux's
``VmHWM`` (``harness.max_rss_mib``): that process's alone, with its model, its imports (the
"ours" worker never imports ``transformers``) and its search; ``ru_maxrss`` would start at this
parent's peak. A worker decodes the first batch once, untimed (one-off start-up costs), then
times all batches. Tokenization and detokenization are outside the timed region for both; the
workers send their token ids back to this process, which compares them (fp32 rescoring of the
differing ones by our model) and scores BLEU.

Settings that make the two searches the same algorithm (default ``--alpha 0``):
  - length limit ``max_len_b`` tokens for every sentence (``max_len_a = 0``; HF has no
    per-sentence limit), EOS included: HF ``max_new_tokens``;
  - PAD and BOS never generated: HF ``suppress_tokens``; EOS blocked at the first step:
    ``min_new_tokens=1``;
  - length penalty: ours is GNMT ``((5 + len) / 6) ** alpha``, HF divides by ``len ** alpha``;
    with ``alpha = 0`` both rank by the raw log-probability sum. ``--alpha 0.6`` runs both with
    their own convention and counts how many outputs differ;
  - stopping: HF ``early_stopping=False`` stops a sentence when its best running beam cannot
    beat the worst of ``k`` finished ones, our rule; exact for ``alpha = 0``.
  - a hypothesis that reaches the length limit: we force EOS and keep EOS's log-probability;
    HF's forced EOS scores 0, so such (rare) hypotheses can rank differently.

BLEU (sacreBLEU, detokenized) of both outputs against the references is printed too.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import sacrebleu
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from seq2seq.checkpoint import load_model, read_pointer  # noqa: E402
from seq2seq.config import DecodeConfig  # noqa: E402
from seq2seq.export import to_marian  # noqa: E402
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID  # noqa: E402
from seq2seq.translate import translate_ids  # noqa: E402

TEST_SPLIT = "test_2016_flickr"

# One batch of source ids in, the best hypothesis of each (without EOS) out.
Decoder = Callable[[list[list[int]]], list[list[int]]]


def read_gz_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


def quick_model(root: Path, minutes: float, threads: int) -> Path:
    """Train (once, cached) a Multi30k model with the recipe config for ``minutes``."""
    out_dir = harness.CACHE / "runs" / f"multi30k_{minutes:g}min"
    existing = read_pointer(out_dir, "best")
    if existing is not None:
        return existing
    overrides = harness.multi30k_overrides(root)
    overrides = [o for o in overrides if not o.startswith("train.out_dir=")] + [
        f"train.out_dir={out_dir}",
        f"train.max_minutes={minutes}",
        f"train.num_threads={threads}",
        # A short budget never leaves the recipe's 800-step warmup: warm up faster.
        "train.warmup_steps=200",
        "train.eval_every=400",
        "train.save_every=400",
        "train.log_every=100",
    ]
    command = [sys.executable, "-m", "seq2seq.train", str(harness.MULTI30K_CONFIG), *overrides]
    print("training a quick model:", " ".join(command), flush=True)
    subprocess.run(command, cwd=harness.REPO, check=True)
    best = read_pointer(out_dir, "best")
    if best is None:
        sys.exit(f"bench_decode: training wrote no checkpoint under {out_dir}")
    return best


def batches_of(sources: list[list[int]], size: int) -> list[list[int]]:
    """Indices sorted by source length (longest first), cut into batches of ``size``."""
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    return [order[i : i + size] for i in range(0, len(order), size)]


def ours_decoder(model, beam: int, alpha: float, max_len: int, bf16: bool) -> Decoder:
    decode = DecodeConfig(
        beam_size=beam, length_penalty=alpha, max_len_a=0.0, max_len_b=max_len, min_len=1
    )

    def run(sources: list[list[int]]) -> list[list[int]]:
        return [nbest[0].tokens for nbest in translate_ids(model, sources, decode, "cpu", bf16)]

    return run


def hf_decoder(marian, beam: int, alpha: float, max_len: int, bf16: bool) -> Decoder:
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def run(sources: list[list[int]]) -> list[list[int]]:
        width = max(len(ids) for ids in sources)
        src = torch.tensor([ids + [PAD_ID] * (width - len(ids)) for ids in sources])
        with torch.inference_mode(), autocast:
            generated = marian.generate(
                input_ids=src,
                attention_mask=src != PAD_ID,
                num_beams=beam,
                do_sample=False,
                max_new_tokens=max_len,
                min_new_tokens=1,
                suppress_tokens=[PAD_ID, BOS_ID],
                length_penalty=alpha,
                early_stopping=False,
                num_return_sequences=1,
            )
        outputs = []
        for row in generated.tolist():
            tokens = row[1:]  # drop the decoder start token
            outputs.append(tokens[: tokens.index(EOS_ID)] if EOS_ID in tokens else tokens)
        return outputs

    return run


def decode_all(
    run: Decoder, sources: list[list[int]], batches: list[list[int]]
) -> tuple[list[list[int]], float]:
    """Outputs in the order of ``sources`` and the seconds taken, after one untimed batch."""
    run([sources[i] for i in batches[0]])
    outputs: list[list[int]] = [[] for _ in sources]
    start = time.perf_counter()
    for batch in batches:
        for i, tokens in zip(batch, run([sources[i] for i in batch])):
            outputs[i] = tokens
    return outputs, time.perf_counter() - start


# ----------------------------------------------------------------------------- worker


def _worker(settings: dict[str, Any]) -> None:
    torch.set_num_threads(settings["threads"])
    sources = json.loads(Path(settings["sources"]).read_text())
    search = (settings["beam"], settings["alpha"], settings["max_len"])
    bf16 = settings["precision"] == "bf16"
    if settings["impl"] == "ours":
        model, _, _ = load_model(settings["model"])
        run, attention = ours_decoder(model, *search, bf16), "sdpa"
    else:
        from transformers import MarianMTModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        marian = MarianMTModel.from_pretrained(settings["model"]).eval()
        run, attention = hf_decoder(marian, *search, bf16), marian.config._attn_implementation
    outputs, seconds = decode_all(run, sources, batches_of(sources, settings["batch_size"]))
    harness.report(
        {
            **{k: settings[k] for k in ("impl", "beam", "precision")},
            "seconds": seconds,
            "tokens": sum(len(o) + 1 for o in outputs),  # EOS included
            "attention": attention,
            "load": round(harness.load_average(), 2),
            "outputs": outputs,
        }
    )


# ----------------------------------------------------------------------------- comparison


@torch.inference_mode()
def sequence_log_prob(model, source: list[int], tokens: list[int]) -> float:
    """Teacher-forced log-probability of ``tokens + [EOS]`` given ``source`` (float32)."""
    src = torch.tensor([source])
    tgt_in = torch.tensor([[BOS_ID, *tokens]])
    log_probs = torch.log_softmax(model(src, tgt_in).float(), dim=-1)
    return float(log_probs[0].gather(-1, torch.tensor([*tokens, EOS_ID])[:, None]).sum())


def explain_differences(model, sources, ours, theirs, max_len: int) -> dict[str, int]:
    """Classify differing outputs by which one the model scores higher (the alpha=0 objective)."""
    counts = {"ours_higher": 0, "hf_higher": 0, "tie": 0, "at_max_len": 0}
    was_training = model.training
    model.eval()
    for source, a, b in zip(sources, ours, theirs):
        if a == b:
            continue
        if max(len(a), len(b)) + 1 >= max_len:
            counts["at_max_len"] += 1
        gap = sequence_log_prob(model, source, a) - sequence_log_prob(model, source, b)
        key = "tie" if abs(gap) < 1e-4 else "ours_higher" if gap > 0 else "hf_higher"
        counts[key] += 1
    model.train(was_training)
    return counts


def fastest_runs(
    args: argparse.Namespace,
    beam: int,
    precision: str,
    paths: dict[str, Path],
    raw: list[dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Run every implementation ``--repeats`` times, alternating who goes first; keep the fastest.

    ``paths`` holds ``sources`` (the token ids, JSON) and each implementation's model directory.
    """
    impls = args.impls.split(",")
    best: dict[str, dict[str, Any]] = {}
    for repeat in range(args.repeats):
        for impl in impls if repeat % 2 == 0 else impls[::-1]:
            settings = dict(
                impl=impl, model=str(paths[impl]), sources=str(paths["sources"]), beam=beam,
                precision=precision, alpha=args.alpha, max_len=args.max_len,
                batch_size=args.batch_size, threads=args.threads,
            )  # fmt: skip
            result = harness.run_worker(Path(__file__), settings)
            raw.append({k: v for k, v in result.items() if k != "outputs"})
            if "error" in result:
                print(f"{impl:>4} beam {beam} {precision}: {result['error']}", flush=True)
                continue
            sentences = len(result["outputs"])
            print(
                f"{impl:>4} beam {beam} {precision}: {sentences / result['seconds']:.1f} "
                f"sentences/s, max RSS {result['max_rss_mib']:,.0f} MiB (load {result['load']})",
                flush=True,
            )
            if impl not in best or result["seconds"] < best[impl]["seconds"]:
                best[impl] = result
    return best


def summarize(best, model, tokenizer, sources, references, max_len: int) -> dict[str, Any]:
    """Speed, memory and BLEU per implementation; agreement of ours and HF where both ran."""
    row: dict[str, Any] = {}
    for impl, result in best.items():
        hypotheses = [tokenizer.decode_target(o) for o in result["outputs"]]
        row[f"{impl}_sent_s"] = len(sources) / result["seconds"]
        row[f"{impl}_tok_s"] = result["tokens"] / result["seconds"]
        row[f"{impl}_bleu"] = sacrebleu.corpus_bleu(hypotheses, [references]).score
        row[f"{impl}_rss"] = result["max_rss_mib"]
    if {"ours", "hf"} <= set(best):
        ours, theirs = best["ours"]["outputs"], best["hf"]["outputs"]
        row["ratio"] = f"{row['ours_sent_s'] / row['hf_sent_s']:.2f}x"
        row["differ"] = sum(a != b for a, b in zip(ours, theirs))
        if row["differ"]:
            row["why"] = explain_differences(model, sources, ours, theirs, max_len)
    return row


# ----------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: train a quick one, cached)")
    parser.add_argument("--data", help="shared data folder (default: $SEQ2SEQ_DATA)")
    parser.add_argument("--train-minutes", type=float, default=8.0, help="quick model budget")
    parser.add_argument("--train-threads", type=int, default=2, help="quick model threads")
    parser.add_argument("--beams", default="5,1", help="beam sizes to run (1 = greedy)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--alpha", type=float, default=0.0, help="length penalty (see above)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch")
    parser.add_argument("--max-len", type=int, default=80, help="generated tokens, EOS included")
    parser.add_argument("--sentences", type=int, default=0, help="first N test sentences (0 all)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (fastest kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--impls", default="ours,hf")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0

    root = harness.data_root(args.data)
    model_dir = (
        Path(args.model)
        if args.model
        else quick_model(root, args.train_minutes, args.train_threads)
    )
    torch.set_num_threads(args.threads)
    info = harness.machine()
    print(f"machine: {json.dumps(info)}\nmodel: {model_dir}", flush=True)
    model, tokenizer, _ = load_model(model_dir)
    sources_text = read_gz_lines(root / "multi30k" / f"{TEST_SPLIT}.de.gz")
    references = read_gz_lines(root / "multi30k" / f"{TEST_SPLIT}.en.gz")
    if args.sentences:
        sources_text, references = sources_text[: args.sentences], references[: args.sentences]
    sources = [ids + [EOS_ID] for ids in tokenizer.encode_source_batch(sources_text)]
    impls = args.impls.split(",")

    rows, results, raw = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as scratch:
        paths = {"ours": model_dir, "hf": Path(scratch) / "marian"}
        paths["sources"] = Path(scratch) / "sources.json"
        paths["sources"].write_text(json.dumps(sources))
        if "hf" in impls:
            to_marian(model, tokenizer).save_pretrained(paths["hf"], safe_serialization=True)
        for beam in (int(b) for b in args.beams.split(",")):
            for precision in args.precisions.split(","):
                best = fastest_runs(args, beam, precision, paths, raw)
                row = {"beam": beam, "precision": precision}
                row |= summarize(best, model, tokenizer, sources, references, args.max_len)
                if "why" in row:
                    print(
                        f"beam {beam} {precision}: differing outputs, fp32 rescoring:", row["why"]
                    )
                rows.append(row)
                results.append({**row, "load": round(harness.load_average(), 2)})

    columns = [("beam", "beam"), ("precision", "precision")]
    for impl in impls:
        label = "ours" if impl == "ours" else "HF"
        columns += [
            (f"{impl}_sent_s", f"{label} sent/s"),
            (f"{impl}_tok_s", f"{label} tok/s"),
            (f"{impl}_bleu", f"{label} BLEU"),
            (f"{impl}_rss", f"{label} max RSS MiB"),
        ]
    columns += [("ratio", "ours/HF"), ("differ", f"outputs differing (of {len(sources)})")]
    print()
    print(harness.table(rows, columns))
    print(
        f"\nalpha {args.alpha}, batch {args.batch_size} sentences, max_len {args.max_len}, "
        f"threads {args.threads}; load average at the end: {harness.load_average():.2f}"
    )
    if args.json:
        payload = {"machine": info, "model": str(model_dir), "args": vars(args)}
        payload |= {"rows": results, "runs": raw}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
