"""Decoding speed and agreement: our search against Hugging Face ``generate`` on the same weights.

    python benchmarks/bench_decode.py --model runs/multi30k/avg
    python benchmarks/bench_decode.py                  # trains a quick model first (cached)

The 1,000 German sentences of Multi30k test_2016_flickr are tokenized once, sorted by length and
cut into batches of 64 sentences; each batch goes through our ``seq2seq.translate.translate_ids``
(encoder once, cached decoder, batched beam search of ``seq2seq.search``) and through
``MarianMTModel.generate`` of ``seq2seq.export.to_marian(model)``: the same network and weights.
Tokenization and detokenization are outside the timed region for both. Runs alternate ours / HF.

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
import time
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


def run_ours(model, sources, batches, beam: int, alpha: float, max_len: int, bf16: bool):
    decode = DecodeConfig(
        beam_size=beam, length_penalty=alpha, max_len_a=0.0, max_len_b=max_len, min_len=1
    )
    outputs: list[list[int]] = [[] for _ in sources]
    start = time.perf_counter()
    for batch in batches:
        hypotheses = translate_ids(model, [sources[i] for i in batch], decode, "cpu", bf16)
        for i, nbest in zip(batch, hypotheses):
            outputs[i] = nbest[0].tokens
    return outputs, time.perf_counter() - start


def run_hf(marian, sources, batches, beam: int, alpha: float, max_len: int, bf16: bool):
    outputs: list[list[int]] = [[] for _ in sources]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    start = time.perf_counter()
    for batch in batches:
        width = max(len(sources[i]) for i in batch)
        src = torch.tensor([sources[i] + [PAD_ID] * (width - len(sources[i])) for i in batch])
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
        for i, row in zip(batch, generated.tolist()):
            tokens = row[1:]  # drop the decoder start token
            outputs[i] = tokens[: tokens.index(EOS_ID)] if EOS_ID in tokens else tokens
    return outputs, time.perf_counter() - start


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
    args = parser.parse_args(argv)

    root = harness.data_root(args.data)
    model_dir = (
        Path(args.model)
        if args.model
        else quick_model(root, args.train_minutes, args.train_threads)
    )
    torch.set_num_threads(args.threads)
    info = harness.machine()
    print(f"machine: {json.dumps(info)}\nmodel: {model_dir}", flush=True)
    model, tokenizer, config = load_model(model_dir)
    marian = to_marian(model, tokenizer)
    sources_text = read_gz_lines(root / "multi30k" / f"{TEST_SPLIT}.de.gz")
    references = read_gz_lines(root / "multi30k" / f"{TEST_SPLIT}.en.gz")
    if args.sentences:
        sources_text, references = sources_text[: args.sentences], references[: args.sentences]
    sources = [ids + [EOS_ID] for ids in tokenizer.encode_source_batch(sources_text)]
    batches = batches_of(sources, args.batch_size)
    runners = {"ours": (run_ours, model), "hf": (run_hf, marian)}
    impls = args.impls.split(",")

    rows, results = [], []
    for beam in (int(b) for b in args.beams.split(",")):
        for precision in args.precisions.split(","):
            best: dict[str, tuple[list[list[int]], float]] = {}
            for repeat in range(args.repeats):
                for impl in impls if repeat % 2 == 0 else impls[::-1]:
                    run, network = runners[impl]
                    outputs, seconds = run(
                        network, sources, batches, beam, args.alpha, args.max_len,
                        precision == "bf16",
                    )  # fmt: skip
                    print(
                        f"{impl:>4} beam {beam} {precision}: {len(sources) / seconds:.1f} "
                        f"sentences/s (load {harness.load_average():.2f})",
                        flush=True,
                    )
                    if impl not in best or seconds < best[impl][1]:
                        best[impl] = (outputs, seconds)
            row: dict[str, Any] = {"beam": beam, "precision": precision}
            for impl, (outputs, seconds) in best.items():
                tokens = sum(len(o) + 1 for o in outputs)  # EOS included
                hypotheses = [tokenizer.decode_target(o) for o in outputs]
                row[f"{impl}_sent_s"] = len(sources) / seconds
                row[f"{impl}_tok_s"] = tokens / seconds
                row[f"{impl}_bleu"] = sacrebleu.corpus_bleu(hypotheses, [references]).score
            if {"ours", "hf"} <= set(best):
                ours, theirs = best["ours"][0], best["hf"][0]
                row["ratio"] = f"{row['ours_sent_s'] / row['hf_sent_s']:.2f}x"
                row["differ"] = sum(a != b for a, b in zip(ours, theirs))
                if row["differ"]:
                    why = explain_differences(model, sources, ours, theirs, args.max_len)
                    print(f"beam {beam} {precision}: differing outputs, fp32 rescoring: {why}")
                    row["why"] = why
            rows.append(row)
            results.append({**row, "load": round(harness.load_average(), 2)})

    columns = [("beam", "beam"), ("precision", "precision")]
    for impl in impls:
        label = "ours" if impl == "ours" else "HF"
        columns += [
            (f"{impl}_sent_s", f"{label} sent/s"),
            (f"{impl}_tok_s", f"{label} tok/s"),
            (f"{impl}_bleu", f"{label} BLEU"),
        ]
    columns += [("ratio", "ours/HF"), ("differ", f"outputs differing (of {len(sources)})")]
    print()
    print(harness.table(rows, columns))
    print(
        f"\nalpha {args.alpha}, batch {args.batch_size} sentences, max_len {args.max_len}, "
        f"threads {args.threads}; load average at the end: {harness.load_average():.2f}"
    )
    if args.json:
        payload = {"machine": info, "model": str(model_dir), "args": vars(args), "rows": results}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
