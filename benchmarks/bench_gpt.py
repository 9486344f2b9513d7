"""Character-level GPT on tiny Shakespeare with nanoGPT's documented CPU setting, via ``train()``.

    python benchmarks/bench_gpt.py                    # fp32 and bf16, 2,000 iterations each
    python benchmarks/bench_gpt.py --precisions bf16 --threads 1

The run is ``seq2seq.train.train(config)`` on ``recipes/configs/shakespeare_gpt.yaml`` (4 layers,
4 heads, d_model 128, block 64, batch 12, 2,000 iterations, dropout 0, evaluation every 250
iterations on 20 batches; nanoGPT's README reports a validation loss of about 1.88 for this
setting), so everything a real run does is timed: the steps, the evaluations and the checkpoint
saves. Preparing the data (character vocabulary, binarized stream) happens once, before timing.
Each precision runs in its own process from an empty output directory (no resume).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from seq2seq.config import load_config  # noqa: E402
from seq2seq.prepare import prepare  # noqa: E402

GPT_CONFIG = harness.REPO / "recipes" / "configs" / "shakespeare_gpt.yaml"
TARGET_LOSS, TARGET_SECONDS = 1.89, 40.0


def gpt_overrides(root: Path, precision: str, threads: int, extra: list[str]) -> list[str]:
    out_dir = harness.CACHE / "runs" / f"shakespeare_gpt_{precision}"
    return [
        f"data.path={root / 'tinyshakespeare' / 'input.txt'}",
        f"prepare.out_dir={harness.CACHE / 'shakespeare_char'}",
        f"train.out_dir={out_dir}",
        f"train.precision={precision}",
        f"train.num_threads={threads}",
        *extra,
    ]


def _worker(settings: dict[str, Any]) -> None:
    from seq2seq.train import train

    config = load_config(GPT_CONFIG, settings["overrides"])
    shutil.rmtree(config.train.out_dir, ignore_errors=True)  # a fresh run, never a resume
    start = time.perf_counter()
    metrics = train(config)
    seconds = time.perf_counter() - start
    harness.report(
        {
            "precision": config.train.precision,
            "iterations": metrics["step"],
            "wall_s": seconds,
            "ms_per_iter": 1000 * seconds / max(metrics["step"], 1),
            "valid_loss": metrics.get("valid_loss"),
            "load": round(harness.load_average(), 2),
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="shared data folder (default: $SEQ2SEQ_DATA)")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--threads", type=int, default=2, help="train.num_threads")
    parser.add_argument("--repeats", type=int, default=1, help="runs per precision")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0

    root = harness.data_root(args.data)
    if not (root / "tinyshakespeare" / "input.txt").is_file():
        sys.exit(f"bench_gpt: {root} has no tinyshakespeare/input.txt")
    precisions = args.precisions.split(",")
    prepare(load_config(GPT_CONFIG, gpt_overrides(root, precisions[0], args.threads, [])))
    info = harness.machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    rows = []
    for repeat in range(args.repeats):
        for precision in precisions if repeat % 2 == 0 else precisions[::-1]:
            overrides = gpt_overrides(root, precision, args.threads, args.overrides)
            result = harness.run_worker(Path(__file__), {"overrides": overrides})
            if "error" in result:
                print(f"{precision}: {result['error']}")
                continue
            result["target_met"] = (
                "yes"
                if result["valid_loss"] <= TARGET_LOSS and result["wall_s"] < TARGET_SECONDS
                else "no"
            )
            rows.append(result)
            print(
                f"{precision}: {result['wall_s']:.1f} s, {result['ms_per_iter']:.1f} ms/iter, "
                f"valid loss {result['valid_loss']:.4f}, load {result['load']}",
                flush=True,
            )
    columns = [
        ("precision", "precision"),
        ("iterations", "iterations"),
        ("wall_s", "wall s"),
        ("ms_per_iter", "ms / iter"),
        ("valid_loss", "final valid loss"),
        ("max_rss_mib", "max RSS MiB"),
        ("load", "load"),
        ("target_met", f"<= {TARGET_LOSS} in < {TARGET_SECONDS:g} s"),
    ]
    print()
    print(harness.table(rows, columns))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
