"""Training memory: peak resident memory against the tensors a step needs, and whether it stays flat.

    python benchmarks/bench_memory.py                         # 300 updates of the Multi30k recipe
    python benchmarks/bench_memory.py --env '' --env SEQ2SEQ_ALLOCATOR=system   # tcmalloc vs glibc

Two fresh processes per setting (``harness.run_worker``):

- **footprint**: the tensors of the recipe's model (``recipes/configs/multi30k.yaml``,
  transformer_small, 4,096-token batches) counted directly: parameters and the optimizer's state
  (``optimizer.state`` after one update) plus the peak of live tensor bytes inside one update on
  the largest batch of the epoch, read from ``torch.profiler`` (``profile_memory=True``: each
  op's allocations less its frees, and the frees between ops, in time order). Gradients and activations
  are inside that peak; the logits of a 4,096-token batch are about 130 MB.
- **training**: ``seq2seq.train.train`` itself for ``--updates`` updates (its evaluations and
  checkpoint saves included), with a thread sampling ``VmRSS`` every 0.2 s. Batches vary in shape
  from update to update (token-budget batching of sentences of every length), which is what makes
  an allocator that caches freed blocks grow.

The report gives the training process's peak RSS, the RSS of the same process before training
(interpreter, torch, the prepared data opened: not tensors), the footprint, their ratio, and the
growth over the run: the highest RSS in the second half against the highest in the first half.
``--max-growth`` (default 1.15) makes the script exit 1 when the run grows more than that, so it
can stand as the bounded-growth check. ``--env NAME=VALUE`` (repeatable; ``''`` = as the CLI sets
it) runs one more setting each, for before/after comparisons of allocator settings. Training runs
as the ``seq2seq`` command would run it: under tcmalloc where it is installed, unless the setting
is ``SEQ2SEQ_ALLOCATOR=system`` or an ``LD_PRELOAD`` of its own.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from seq2seq.config import load_config  # noqa: E402


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _config(settings: dict[str, Any]):
    root = Path(settings["data"])
    overrides = harness.multi30k_overrides(root) + [
        f"train.out_dir={harness.CACHE / 'runs' / 'memory'}",
        f"train.max_steps={settings['updates']}",
        "train.max_minutes=0",
        f"train.precision={settings['precision']}",
        "train.num_threads=2",
    ]
    return load_config(harness.MULTI30K_CONFIG, overrides)


def _footprint_worker(settings: dict[str, Any]) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from seq2seq import distributed, train
    from seq2seq.data import TokenizedCorpus, batch_indices, collate
    from seq2seq.tokenizer import Tokenizer

    config = _config(settings)
    prepared = config.prepared_dir()
    tokenizer = Tokenizer.load(prepared / "tokenizer")
    corpus = TokenizedCorpus(prepared, config.data.train_split)
    order = batch_indices(corpus, config.batch.max_tokens, config.train.seed, epoch=1)
    batches = [collate(corpus, indices) for indices in order]
    largest = max(batches, key=lambda b: b.src.numel() + b.tgt_in.numel())
    info = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    run = train.build_run(config, info, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    train.train_step(run, [largest])  # creates the optimizer state
    params = sum(p.numel() * p.element_size() for p in run.model.parameters())
    state = sum(
        value.numel() * value.element_size()
        for per_param in run.optimizer.state.values()
        for value in per_param.values()
        if torch.is_tensor(value)
    )
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train.train_step(run, [largest])
    # Each op's own allocations less its frees, and the frees between ops ("[memory]"), in time
    # order: the live tensor bytes after each op, relative to the start of the update.
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    mib = 1 / 2**20
    harness.report(
        {
            "params_mib": params * mib,
            "optimizer_mib": state * mib,
            "step_peak_mib": peak * mib,
            "footprint_mib": (params + state + peak) * mib,
            "largest_batch": list(largest.src.shape) + list(largest.tgt_in.shape),
        }
    )


def _training_worker(settings: dict[str, Any]) -> None:
    from seq2seq.train import train

    config = _config(settings)
    shutil.rmtree(config.train.out_dir, ignore_errors=True)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append((time.perf_counter(), _rss_mib()))
            done.wait(0.2)

    import torch  # noqa: F401 - counted in the baseline, as in a real run

    baseline = _rss_mib()
    sampler = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    sampler.start()
    metrics = train(config)
    done.set()
    sampler.join()
    end = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    middle = start + (end - start) / 2
    first = max((rss for t, rss in samples if t < middle), default=0.0)
    second = max((rss for t, rss in samples if t >= middle), default=0.0)
    harness.report(
        {
            "updates": metrics["step"],
            "wall_s": end - start,
            "user_s": usage.ru_utime,
            "sys_s": usage.ru_stime,
            "minor_faults": usage.ru_minflt,
            "baseline_mib": baseline,
            "first_half_mib": first,
            "second_half_mib": second,
            "growth": second / first if first else None,
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="folder holding multi30k/ (default: $SEQ2SEQ_DATA)")
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--max-growth", type=float, default=1.15)
    parser.add_argument("--env", action="append", default=None, metavar="NAME=VALUE")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import json

        settings = json.loads(args.worker)
        (_footprint_worker if settings["kind"] == "footprint" else _training_worker)(settings)
        return 0

    from seq2seq.__main__ import configure_process

    configure_process()  # the process defaults `seq2seq train` runs with, inherited by the workers
    root = harness.data_root(args.data)
    settings = {"data": str(root), "updates": args.updates, "precision": args.precision}
    from seq2seq.prepare import prepare

    prepare(_config(settings))  # once, before anything is measured
    from seq2seq.hardware import cpu_class

    print(f"CPU class {cpu_class()}, {os.cpu_count()} cores, precision {args.precision}")
    footprint = harness.run_worker(Path(__file__), {**settings, "kind": "footprint"})
    print(
        "footprint: parameters {params_mib:.0f} MiB + optimizer {optimizer_mib:.0f} MiB + one "
        "update's peak {step_peak_mib:.0f} MiB (largest batch {largest_batch}) = "
        "{footprint_mib:.0f} MiB".format(**footprint)
    )
    rows, worst = [], 1.0
    for assignment in args.env or [""]:
        saved = dict(os.environ)
        if assignment:
            name, _, value = assignment.partition("=")
            os.environ[name] = value
        try:
            result = harness.run_worker(
                Path(__file__), {**settings, "kind": "training"}, as_cli=True
            )
        finally:
            os.environ.clear()
            os.environ.update(saved)
        result["setting"] = assignment or "(as `seq2seq train` runs)"
        result["ratio"] = result["max_rss_mib"] / footprint["footprint_mib"]
        rows.append(result)
        worst = max(worst, result.get("growth") or 0.0)
    columns = [
        ("setting", "setting"),
        ("updates", "updates"),
        ("wall_s", "wall s"),
        ("user_s", "user CPU s"),
        ("sys_s", "system CPU s"),
        ("minor_faults", "page faults"),
        ("baseline_mib", "RSS before training MiB"),
        ("max_rss_mib", "peak RSS MiB"),
        ("ratio", "peak RSS / footprint"),
        ("first_half_mib", "peak, 1st half MiB"),
        ("second_half_mib", "peak, 2nd half MiB"),
        ("growth", "growth"),
    ]
    print(harness.table(rows, columns))
    if worst > args.max_growth:
        print(f"RSS grew {worst:.2f}x from the first half to the second (> {args.max_growth})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
