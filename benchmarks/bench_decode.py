"""Decoding speed, memory and agreement: ours against CTranslate2 and Hugging Face ``generate``.

    python benchmarks/bench_decode.py --model runs/quickstart/model
    python benchmarks/bench_decode.py                  # trains a quick model first (cached)
    python benchmarks/bench_decode.py --model DIR --engines ours:fp32,ct2:fp32 --beams 5

Engines (``--engines``, ``impl:precision``), all on the same weights:
  - ``ours:fp32`` / ``ours:int8`` / ``ours:bf16``: :func:`seq2seq.decoding.search_batches` (the
    code ``seq2seq translate`` and ``Translator`` run: on the CPU, one batch per thread, each
    searched single-threaded), on the model laid out by
    :func:`seq2seq.kernels.prepare_cpu_decoding` as they prepare it; int8 through
    :func:`seq2seq.decoding.quantize_int8` (``--precision int8``);
  - ``ct2:fp32`` / ``ct2:int8``: ``ctranslate2.Translator`` on ``seq2seq export --format
    ctranslate2`` of the model (``--quantization float32`` / ``int8``), fed SentencePiece pieces
    as its README says; one translator of ``--threads`` threads (``intra_threads``);
  - ``ct2-inter:fp32`` / ``ct2-inter:int8``: the same model as ``--threads`` translators of one
    thread each (``inter_threads``), every batch submitted at once (``asynchronous=True``), the
    layout CTranslate2 recommends for throughput;
  - ``hf:fp32`` / ``hf:bf16``: ``MarianMTModel.generate`` of ``seq2seq.export.to_marian(model)``,
    saved with ``save_pretrained`` and loaded with ``from_pretrained``, batch after batch.

The 1,000 German sentences of Multi30k test_2016_flickr are cut, by source length (longest
first), into batches of ``--batch-size`` sentences, the same batches for every engine. Each
engine is timed end to end, from the source text of all batches to their detokenized output
(tokenization, search, detokenization), with ``--threads`` threads in all. Each (engine, beam,
repeat) runs in its own process, which translates the first batch once untimed and then all
batches; the fastest of ``--repeats`` is kept, the engines alternating order between repeats.
Peak RSS is that process's ``VmHWM`` (``harness.max_rss_mib``); the CTranslate2 worker imports
neither torch nor ``seq2seq``, so its peak is CTranslate2's own (torch's import alone is ~200 MiB
of it in the others). Every process runs as ``seq2seq translate`` runs itself:
``OMP_WAIT_POLICY=PASSIVE`` (unless set; both ours and CTranslate2 use libgomp), or with
``--spin`` libgomp's default spin-then-sleep; ``THP_MEM_ALLOC_ENABLE=1``; tcmalloc preloaded
where installed.

Settings that make the searches the same algorithm (default ``--alpha 0``):
  - length limit ``--max-len`` generated tokens for every sentence, EOS included: ours
    ``max_len_a = 0, max_len_b = N``; HF ``max_new_tokens = N``; CTranslate2
    ``max_decoding_length = N - 1`` (it does not count EOS);
  - PAD and BOS never generated: HF ``suppress_tokens``; EOS blocked at the first step:
    ours ``min_len = 1``, HF ``min_new_tokens = 1``, CTranslate2 ``min_decoding_length = 1``;
  - length penalty: ours is GNMT ``((5 + len) / 6) ** alpha``, HF and CTranslate2 divide by
    ``len ** alpha``; with ``alpha = 0`` all rank by the raw log-probability sum;
  - stopping: HF ``early_stopping=False`` stops a sentence when its best running beam cannot
    beat the worst of ``k`` finished ones, our rule; exact for ``alpha = 0``;
  - a hypothesis that reaches the length limit: we force EOS and keep its log-probability,
    HF's forced EOS scores 0 and CTranslate2 stops before it, so such (rare) hypotheses can rank
    differently.

Outputs are compared as detokenized text with ``ours:fp32``'s; differing ones are re-encoded and
rescored in fp32 by our model (who found the higher log-probability). BLEU is sacreBLEU on the
detokenized text against the references. ``--profile`` instead runs ``torch.profiler`` over our
fp32 search of every batch (each beam) and prints the operators by self time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
TEST_SPLIT = "test_2016_flickr"
CT2_QUANTIZATION = {"fp32": "float32", "int8": "int8"}
ENGINES = ("ours:fp32", "ct2:fp32", "ct2-inter:fp32", "hf:fp32", "ours:int8", "ct2:int8")

# Batches of source sentences in, per batch one detokenized translation per sentence out.
Engine = Callable[[list[list[str]]], list[list[str]]]


def read_gz_lines(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [line.rstrip("\n") for line in handle]


def quick_model(root: Path, minutes: float, threads: int) -> Path:
    """Train (once, cached) a Multi30k model with the recipe config for ``minutes``."""
    import harness  # imports torch, which the CTranslate2 worker must not

    from seq2seq.checkpoint import read_pointer

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


def batches_of(lengths: list[int], size: int) -> list[list[int]]:
    """Indices sorted by source length (longest first), cut into batches of ``size``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + size] for i in range(0, len(order), size)]


# ----------------------------------------------------------------------------- engines


def ours_engine(model_dir: str, precision: str, search: dict[str, Any]) -> Engine:
    from seq2seq.checkpoint import load_model
    from seq2seq.config import DecodeConfig
    from seq2seq.decoding import clean_line, quantize_int8, search_batches
    from seq2seq.kernels import prepare_cpu_decoding
    from seq2seq.tokenizer import EOS_ID

    model, tokenizer, _ = load_model(model_dir)
    if precision == "int8":
        model = quantize_int8(model, "cpu")
    prepare_cpu_decoding(model)  # as seq2seq translate and Translator.load do
    dtype = {"fp32": None, "int8": None, "bf16": "bfloat16"}[precision]
    decode = DecodeConfig(
        beam_size=search["beam"], length_penalty=search["alpha"], max_len_a=0.0,
        max_len_b=search["max_len"], min_len=1,
    )  # fmt: skip

    def run(batches: list[list[str]]) -> list[list[str]]:
        import torch

        sources = [
            [ids + [EOS_ID] for ids in tokenizer.encode_source_batch(lines)] for lines in batches
        ]
        dtype_ = getattr(torch, dtype) if dtype else None
        return [
            [clean_line(tokenizer.decode_target(hyps[0].tokens)) for hyps in nbest]
            for nbest in search_batches(model, sources, decode, "cpu", dtype=dtype_)
        ]

    return run


def ct2_engine(model_dir: str, threads: int, search: dict[str, Any], inter: bool) -> Engine:
    """``inter``: ``threads`` translators of one thread each, fed batches side by side (what
    CTranslate2 documents for throughput), else one translator of ``threads`` threads."""
    import ctranslate2
    import sentencepiece

    source = sentencepiece.SentencePieceProcessor(model_file=f"{model_dir}/source.spm")
    target = sentencepiece.SentencePieceProcessor(model_file=f"{model_dir}/target.spm")
    translator = ctranslate2.Translator(
        model_dir, device="cpu", intra_threads=1 if inter else threads,
        inter_threads=threads if inter else 1,
    )  # fmt: skip

    def run(batches: list[list[str]]) -> list[list[str]]:
        pending = []
        for lines in batches:  # every batch submitted at once; each translator takes the next
            tokens = [pieces + ["</s>"] for pieces in source.encode(lines, out_type=str)]
            pending.append(
                translator.translate_batch(
                    tokens,
                    beam_size=search["beam"],
                    length_penalty=search["alpha"],
                    max_decoding_length=search["max_len"] - 1,
                    min_decoding_length=1,
                    max_batch_size=len(lines),
                    asynchronous=True,
                )  # fmt: skip
            )
        return [[target.decode(r.result().hypotheses[0]) for r in results] for results in pending]

    return run


def hf_engine(model_dir: str, precision: str, search: dict[str, Any]) -> Engine:
    import torch
    from transformers import MarianMTModel
    from transformers.utils import logging as hf_logging

    from seq2seq.checkpoint import load_model
    from seq2seq.decoding import clean_line
    from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID

    hf_logging.disable_progress_bar()
    _, tokenizer, _ = load_model(search["ours_dir"])  # the tokenizer; the weights are Marian's
    marian = MarianMTModel.from_pretrained(model_dir).eval()
    bf16 = precision == "bf16"

    def run(batches: list[list[str]]) -> list[list[str]]:
        return [run_batch(lines) for lines in batches]

    def run_batch(lines: list[str]) -> list[str]:
        sources = [ids + [EOS_ID] for ids in tokenizer.encode_source_batch(lines)]
        width = max(len(ids) for ids in sources)
        src = torch.tensor([ids + [PAD_ID] * (width - len(ids)) for ids in sources])
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            generated = marian.generate(
                input_ids=src, attention_mask=src != PAD_ID, num_beams=search["beam"],
                do_sample=False, max_new_tokens=search["max_len"], min_new_tokens=1,
                suppress_tokens=[PAD_ID, BOS_ID], length_penalty=search["alpha"],
                early_stopping=False, num_return_sequences=1,
            )  # fmt: skip
        outputs = []
        for row in generated.tolist():
            tokens = row[1:]  # drop the decoder start token
            tokens = tokens[: tokens.index(EOS_ID)] if EOS_ID in tokens else tokens
            outputs.append(clean_line(tokenizer.decode_target(tokens)))
        return outputs

    return run


def translate_all(
    run: Engine, lines: list[str], batches: list[list[int]]
) -> tuple[list[str], float]:
    """Outputs in the order of ``lines`` and the seconds taken, after one untimed batch."""
    run([[lines[i] for i in batches[0]]])
    outputs = [""] * len(lines)
    start = time.perf_counter()
    translated = run([[lines[i] for i in batch] for batch in batches])
    seconds = time.perf_counter() - start
    for batch, texts in zip(batches, translated):
        for i, text in zip(batch, texts):
            outputs[i] = text
    return outputs, seconds


# ----------------------------------------------------------------------------- worker


def _peak_rss_mib() -> float:
    """``harness.max_rss_mib`` without importing harness (which imports torch)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _worker(settings: dict[str, Any]) -> None:
    impl, precision = settings["engine"].split(":")
    lines = json.loads(Path(settings["sources"]).read_text())
    batches = json.loads(Path(settings["batches"]).read_text())
    if impl in ("ct2", "ct2-inter"):
        run = ct2_engine(settings["model"], settings["threads"], settings, impl == "ct2-inter")
    else:
        import torch

        torch.set_num_threads(settings["threads"])
        make = ours_engine if impl == "ours" else hf_engine
        run = make(settings["model"], precision, settings)
    outputs, seconds = translate_all(run, lines, batches)
    result = {"engine": settings["engine"], "beam": settings["beam"], "seconds": seconds}
    result |= {"outputs": outputs, "max_rss_mib": round(_peak_rss_mib(), 1)}
    # harness.RESULT_PREFIX, spelled out: harness would import torch into the CTranslate2 worker.
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- comparison


def sequence_log_prob(model, source: list[int], tokens: list[int]) -> float:
    """Teacher-forced log-probability of ``tokens + [EOS]`` given ``source`` (float32)."""
    import torch

    from seq2seq.tokenizer import BOS_ID, EOS_ID

    with torch.inference_mode():
        src = torch.tensor([source])
        tgt_in = torch.tensor([[BOS_ID, *tokens]])
        log_probs = torch.log_softmax(model(src, tgt_in).float(), dim=-1)
        return float(log_probs[0].gather(-1, torch.tensor([*tokens, EOS_ID])[:, None]).sum())


def explain_differences(model, tokenizer, lines, ours, theirs, max_len: int) -> dict[str, int]:
    """Classify differing outputs by which one the model scores higher (the alpha=0 objective);
    outputs are re-encoded from their text."""
    from seq2seq.tokenizer import EOS_ID

    counts = {"ours_higher": 0, "theirs_higher": 0, "tie": 0, "at_max_len": 0}
    model.eval()
    for line, a, b in zip(lines, ours, theirs):
        if a == b:
            continue
        source = tokenizer.encode_source(line) + [EOS_ID]
        a_ids, b_ids = tokenizer.encode_target(a), tokenizer.encode_target(b)
        if max(len(a_ids), len(b_ids)) + 1 >= max_len:
            counts["at_max_len"] += 1
        gap = sequence_log_prob(model, source, a_ids) - sequence_log_prob(model, source, b_ids)
        key = "tie" if abs(gap) < 1e-4 else "ours_higher" if gap > 0 else "theirs_higher"
        counts[key] += 1
    return counts


def fastest_runs(
    args: argparse.Namespace, beam: int, paths: dict[str, Path], raw: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Run every engine ``--repeats`` times, alternating the order; keep each one's fastest."""
    import harness

    engines = args.engines.split(",")
    best: dict[str, dict[str, Any]] = {}
    for repeat in range(args.repeats):
        for engine in engines if repeat % 2 == 0 else engines[::-1]:
            impl, precision = engine.split(":")
            model = paths[f"ct2:{precision}"] if impl.startswith("ct2") else paths[impl]
            settings = dict(
                engine=engine, model=str(model), ours_dir=str(paths["ours"]),
                sources=str(paths["sources"]), batches=str(paths["batches"]), beam=beam,
                alpha=args.alpha, max_len=args.max_len, threads=args.threads,
            )  # fmt: skip
            result = harness.run_worker(Path(__file__), settings, as_cli=True)
            raw.append({k: v for k, v in result.items() if k != "outputs"})
            if "error" in result:
                print(f"{engine:>9} beam {beam}: {result['error']}", flush=True)
                continue
            rate = len(result["outputs"]) / result["seconds"]
            print(
                f"{engine:>9} beam {beam}: {rate:.1f} sentences/s, max RSS "
                f"{result['max_rss_mib']:,.0f} MiB (load {harness.load_average():.2f})",
                flush=True,
            )
            if engine not in best or result["seconds"] < best[engine]["seconds"]:
                best[engine] = result
    return best


def summarize(
    beam: int, best: dict[str, dict[str, Any]], model, tokenizer, lines, references, max_len: int
) -> list[dict[str, Any]]:
    """One row per engine: speed, BLEU, memory, outputs differing from ours fp32, ours/it."""
    import sacrebleu

    rows = []
    reference = best.get("ours:fp32")
    for engine, result in best.items():
        impl, precision = engine.split(":")
        outputs = result["outputs"]
        row: dict[str, Any] = {"beam": beam, "engine": engine}
        row["sent_s"] = len(lines) / result["seconds"]
        row["tok_s"] = sum(len(tokenizer.encode_target(o)) + 1 for o in outputs) / result["seconds"]
        row["bleu"] = sacrebleu.corpus_bleu(outputs, [references]).score
        row["rss"] = result["max_rss_mib"]
        if reference is not None and engine != "ours:fp32":
            row["differ"] = sum(a != b for a, b in zip(reference["outputs"], outputs))
            if row["differ"]:
                row["why"] = explain_differences(
                    model, tokenizer, lines, reference["outputs"], outputs, max_len
                )
        ours = best.get(f"ours:{precision}")
        if impl != "ours" and ours is not None:
            row["ratio"] = f"{result['seconds'] / ours['seconds']:.2f}x"
        rows.append(row)
    return rows


def profile(model_dir: Path, lines: list[str], batches, args: argparse.Namespace) -> None:
    """``torch.profiler`` over our fp32 search of every batch, per beam: operators by self time."""
    import torch
    from torch.profiler import ProfilerActivity

    for beam in (int(b) for b in args.beams.split(",")):
        search = dict(beam=beam, alpha=args.alpha, max_len=args.max_len)
        run = ours_engine(str(model_dir), "fp32", search)
        run([[lines[i] for i in batches[0]]])
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches:  # one at a time: the operators' own threading
                run([[lines[i] for i in batch]])
        print(f"\nbeam {beam}, fp32, {len(lines)} sentences in batches of {args.batch_size}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


# ----------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model directory (default: train a quick one, cached)")
    parser.add_argument("--data", help="shared data folder (default: $SEQ2SEQ_DATA)")
    parser.add_argument("--train-minutes", type=float, default=8.0, help="quick model budget")
    parser.add_argument("--train-threads", type=int, default=2, help="quick model threads")
    parser.add_argument("--beams", default="5,1", help="beam sizes to run (1 = greedy)")
    parser.add_argument("--engines", default=",".join(ENGINES), help="impl:precision, ...")
    parser.add_argument("--alpha", type=float, default=0.0, help="length penalty (see above)")
    parser.add_argument("--batch-size", type=int, default=64, help="sentences per batch")
    parser.add_argument("--max-len", type=int, default=80, help="generated tokens, EOS included")
    parser.add_argument("--sentences", type=int, default=0, help="first N test sentences (0 all)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (fastest kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--spin",
        action="store_true",
        help="idle OpenMP threads spin (libgomp's default) instead of sleeping, in every engine",
    )
    parser.add_argument("--profile", action="store_true", help="profile ours instead (above)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    for engine in args.engines.split(","):
        impl, _, precision = engine.partition(":")
        allowed = {
            "ours": ("fp32", "int8", "bf16"),
            "ct2": ("fp32", "int8"),
            "ct2-inter": ("fp32", "int8"),
            "hf": ("fp32", "bf16"),
        }
        if precision not in allowed.get(impl, ()):
            parser.error(f"--engines: {engine!r} is not one of impl:precision {allowed}")

    # Every engine's process gets what ``seq2seq translate`` gives itself (seq2seq/__main__.py):
    # one OpenMP wait policy (both ours and CTranslate2 run on libgomp), transparent huge pages,
    # and tcmalloc where installed (``harness.run_worker(as_cli=True)``).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if args.spin:
        os.environ["GOMP_SPINCOUNT"] = "300000"  # libgomp's default spin, over any wait policy

    import harness
    import torch

    from seq2seq.checkpoint import load_model
    from seq2seq.hardware import cpu_class

    root = harness.data_root(args.data)
    model_dir = (
        Path(args.model)
        if args.model
        else quick_model(root, args.train_minutes, args.train_threads)
    )
    torch.set_num_threads(args.threads)
    info = harness.machine() | {"cpu_class": cpu_class()}
    print(f"machine: {json.dumps(info)}\nmodel: {model_dir}", flush=True)
    model, tokenizer, _ = load_model(model_dir)
    lines = read_gz_lines(root / "multi30k" / f"{TEST_SPLIT}.de.gz")
    references = read_gz_lines(root / "multi30k" / f"{TEST_SPLIT}.en.gz")
    if args.sentences:
        lines, references = lines[: args.sentences], references[: args.sentences]
    lengths = [len(ids) for ids in tokenizer.encode_source_batch(lines)]
    batches = batches_of(lengths, args.batch_size)
    if args.profile:
        profile(model_dir, lines, batches, args)
        return 0
    engines = args.engines.split(",")

    rows, raw = [], []
    with tempfile.TemporaryDirectory(prefix="bench_decode_") as scratch:
        paths = {"ours": model_dir, "hf": Path(scratch) / "marian"}
        paths["sources"], paths["batches"] = Path(scratch) / "lines.json", Path(scratch) / "b.json"
        paths["sources"].write_text(json.dumps(lines))
        paths["batches"].write_text(json.dumps(batches))
        if any(e.startswith("hf:") for e in engines):
            from seq2seq.export import to_marian

            to_marian(model, tokenizer).save_pretrained(paths["hf"], safe_serialization=True)
        for precision in ("fp32", "int8"):
            if any(e in engines for e in (f"ct2:{precision}", f"ct2-inter:{precision}")):
                from seq2seq.export_ct2 import save_ctranslate2

                out = Path(scratch) / f"ct2_{precision}"
                paths[f"ct2:{precision}"] = out
                save_ctranslate2(model, tokenizer, out, CT2_QUANTIZATION[precision])
        for beam in (int(b) for b in args.beams.split(",")):
            best = fastest_runs(args, beam, paths, raw)
            for row in summarize(beam, best, model, tokenizer, lines, references, args.max_len):
                if "why" in row:
                    print(f"beam {beam} {row['engine']}: differing outputs, fp32 rescoring:")
                    print(f"  {row['why']}")
                rows.append(row)

    columns = [
        ("beam", "beam"), ("engine", "engine"), ("sent_s", "sent/s"), ("tok_s", "tok/s"),
        ("ratio", "ours/this (same precision)"), ("bleu", "BLEU"), ("rss", "max RSS MiB"),
        ("differ", f"outputs differing from ours:fp32 (of {len(lines)})"),
    ]  # fmt: skip
    print()
    print(harness.table(rows, columns))
    print(
        f"\nalpha {args.alpha}, batch {args.batch_size} sentences, max_len {args.max_len}, "
        f"threads {args.threads}, OpenMP "
        f"{'spin (GOMP_SPINCOUNT=300000)' if args.spin else os.environ['OMP_WAIT_POLICY']}; "
        f"load average at the end: {harness.load_average():.2f}"
    )
    if args.json:
        payload = {"machine": info, "model": str(model_dir), "args": vars(args)}
        payload |= {"rows": rows, "runs": raw}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(BENCHMARKS))  # harness, beside this script
    sys.exit(main())
