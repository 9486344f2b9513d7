"""Character-level GPT on tiny Shakespeare: nanoGPT itself against ours, on nanoGPT's CPU setting.

    NANOGPT_DIR=~/nanoGPT python benchmarks/bench_gpt.py           # nanoGPT, ours fp32, ours auto
    python benchmarks/bench_gpt.py --precisions fp32 --threads 1 --max-iters 200

The setting is the CPU line of nanoGPT's README: ``train.py config/train_shakespeare_char.py
--device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12
--n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``
(4 layers, 4 heads, d_model 128, block 64, batch 12, 2,000 iterations, evaluation every 250 on
20 batches; its README reports a validation loss of about 1.88). Ours is the ``seq2seq train``
program on ``recipes/configs/shakespeare_gpt.yaml``, the same setting, so everything a real run
does is timed in both: steps, evaluations, checkpoint saves and logging.

nanoGPT runs from a scratch copy of the checkout named by ``--nanogpt`` or ``$NANOGPT_DIR``
(skipped with a message when neither is set) under ``benchmarks/.cache/nanogpt``: the shared
``tinyshakespeare/input.txt`` is put where its ``data/shakespeare_char/prepare.py`` would
download it, and that script runs unchanged. It imports ``requests`` for the download it then
skips; without the package a stand-in module that refuses any download is put on its path.

Every run is a fresh process on the same ``--threads`` cores: nanoGPT (which sets no threads
itself) with that many OpenMP and MKL threads, ours split among its ``train.processes`` ranks
(``train.num_threads`` and the OpenMP/MKL variables at cores / ranks each); ``--nanogpt-threads``
adds nanoGPT runs at other thread counts, and the table gives ours against the fastest nanoGPT
as well. All runs share one OpenMP wait policy: ``$OMP_WAIT_POLICY``, else ``PASSIVE`` (what
``seq2seq`` sets itself), or with ``--spin`` libgomp's default spin-then-sleep. On two idle
cores spinning halves a two-thread update; beside another multi-threaded process it made ours 36x
slower (benchmarks/RESULTS.md), hence the command's default. Two wall times are reported: the whole process (start to exit, imports included) and
the training loop (nanoGPT: the sum of its per-iteration times, which include its evaluations and
saves; ours: the ``train_seconds`` of its closing line). ms/iteration is the loop time per
iteration (nanoGPT runs ``max_iters + 1`` of them). The validation loss is each program's own
last evaluation: nanoGPT draws 20 fresh random batches each time, ours 20 fixed ones, so the two
differ by sampling noise of a few hundredths on top of any real difference. Hence a second figure,
the same yardstick for both: each program's kept model (nanoGPT's ``ckpt.pt``, ours the ``best``
checkpoint) scores the whole validation text (the last 10% of ``input.txt``, 111,540 characters, the
split both programs hold out) in consecutive blocks of 64 characters, every character but a block's
first predicted from the ones before it in its block: 1,742 x 64 predictions, no sampling. The
target's "loss no worse" is judged on that figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from seq2seq.api import LanguageModel  # noqa: E402
from seq2seq.checkpoint import read_pointer  # noqa: E402
from seq2seq.config import load_config  # noqa: E402
from seq2seq.prepare import prepare  # noqa: E402

GPT_CONFIG = harness.REPO / "recipes" / "configs" / "shakespeare_gpt.yaml"
NANOGPT_CACHE = harness.CACHE / "nanogpt"
TARGET_RATIO = 0.7  # ours / nanoGPT wall time, at a validation loss no worse than nanoGPT's
NANOGPT_ARGS = [
    "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
    "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
    "--n_embd=128", "--dropout=0.0",
]  # fmt: skip
REQUESTS_STAND_IN = (
    "def get(*args, **kwargs):\n"
    "    raise RuntimeError('bench_gpt: no downloads; input.txt should already be in place')\n"
)


def gpt_overrides(
    root: Path, precision: str, threads: int, max_iters: int, extra: list[str]
) -> list[str]:
    """Ours on ``threads`` cores: each of ``train.processes`` ranks gets an equal share."""
    processes = load_config(GPT_CONFIG, extra).train.processes
    out_dir = harness.CACHE / "runs" / f"shakespeare_gpt_{precision}"
    return [
        f"data.path={root / 'tinyshakespeare' / 'input.txt'}",
        f"prepare.out_dir={harness.CACHE / 'shakespeare_char'}",
        f"train.out_dir={out_dir}",
        f"train.precision={precision}",
        f"train.num_threads={max(1, threads // processes)}",
        f"train.max_steps={max_iters}",
        *extra,
    ]


def run_ours(
    root: Path, precision: str, threads: int, max_iters: int, extra: list[str], spin: bool
) -> dict:
    """The ``seq2seq train`` program, as a user runs it; figures from its closing metrics line."""
    overrides = gpt_overrides(root, precision, threads, max_iters, extra)
    config = load_config(GPT_CONFIG, overrides)
    shutil.rmtree(config.train.out_dir, ignore_errors=True)  # a fresh run, never a resume
    command = [sys.executable, "-m", "seq2seq", "train", str(GPT_CONFIG), *overrides]
    start = time.perf_counter()
    processes = config.train.processes
    env = thread_env(max(1, threads // processes), spin)
    done = subprocess.run(
        command, cwd=harness.REPO, stdout=subprocess.PIPE, text=True, check=False, env=env
    )
    wall = time.perf_counter() - start
    program = f"ours {precision}" + (f", {processes} ranks" if processes > 1 else "")
    if done.returncode != 0:
        return {"program": program, "error": done.stdout.strip().splitlines()[-1:]}
    lines = done.stdout.splitlines()
    summary = next(line for line in reversed(lines) if line.startswith("step "))
    figures = dict(item.rsplit(" ", 1) for item in summary.split(" | "))
    iterations, loop = int(figures["step"]), float(figures["train_seconds"])
    return {
        "program": program,
        "iterations": iterations,
        "wall_s": wall,
        "loop_s": loop,
        "ms_per_iter": 1000 * loop / max(iterations, 1),
        "valid_loss": float(figures["valid_loss"]),
        "full_valid_loss": score_ours(read_pointer(config.train.out_dir, "best"), root),
    }


BLOCK = 64  # the context both programs train with


def validation_text(root: Path) -> str:
    """The held-out tail both programs use: nanoGPT's ``data[int(n * 0.9):]`` of ``input.txt``."""
    text = (root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    return text[int(len(text) * 0.9) :]


@torch.no_grad()
def mean_block_loss(logits_of: Callable[[torch.Tensor], torch.Tensor], ids: list[int]) -> float:
    """Mean next-character loss (nats) over consecutive ``BLOCK``-long blocks of ``ids``."""
    ids_tensor = torch.tensor(ids)
    n = (len(ids) - 1) // BLOCK
    inputs = ids_tensor[: n * BLOCK].view(n, BLOCK)
    targets = ids_tensor[1 : n * BLOCK + 1].view(n, BLOCK)
    total = 0.0
    for start in range(0, n, 256):
        logits = logits_of(inputs[start : start + 256]).float()
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), targets[start : start + 256].flatten(), reduction="sum"
        ).item()
    return total / (n * BLOCK)


def score_ours(checkpoint: Path | None, root: Path) -> float | None:
    if checkpoint is None:
        return None
    lm = LanguageModel.load(checkpoint, device="cpu", precision="fp32")
    model = lm.model.eval()
    return mean_block_loss(model, lm.tokenizer.encode_target(validation_text(root)))


def score_nanogpt(directory: Path, out_dir: Path, root: Path) -> float | None:
    """nanoGPT's saved model (its own ``model.py``; the checkpoint read as tensors only)."""
    checkpoint = out_dir / "ckpt.pt"
    if not checkpoint.is_file():
        return None
    spec = importlib.util.spec_from_file_location("nanogpt_model", directory / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = module.GPT(module.GPTConfig(**saved["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    model.eval()
    network = model.transformer

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        # GPT.forward without targets returns the last position only; this is its body for all.
        h = network.drop(network.wte(x) + network.wpe(torch.arange(x.shape[1])))
        for block in network.h:
            h = block(h)
        return model.lm_head(network.ln_f(h))

    text = validation_text(root)
    characters = sorted(set((root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")))
    index = {c: i for i, c in enumerate(characters)}  # its prepare.py's vocabulary
    return mean_block_loss(logits_of, [index[c] for c in text])


def prepare_nanogpt(checkout: Path, input_txt: Path) -> Path:
    """A scratch copy of the checkout with its character data prepared by its own prepare.py."""
    if not (checkout / "train.py").is_file():
        sys.exit(f"bench_gpt: {checkout} is not a nanoGPT checkout (no train.py)")
    shutil.rmtree(NANOGPT_CACHE, ignore_errors=True)
    shutil.copytree(checkout, NANOGPT_CACHE, ignore=shutil.ignore_patterns(".git", "out*"))
    data_dir = NANOGPT_CACHE / "data" / "shakespeare_char"
    shutil.copyfile(input_txt, data_dir / "input.txt")
    env = dict(os.environ)
    if importlib.util.find_spec("requests") is None:
        stand_in = harness.CACHE / "requests_stand_in"
        stand_in.mkdir(parents=True, exist_ok=True)
        (stand_in / "requests.py").write_text(REQUESTS_STAND_IN)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(stand_in), env.get("PYTHONPATH")]))
    subprocess.run(
        [sys.executable, "prepare.py"], cwd=data_dir, env=env, check=True, stdout=subprocess.DEVNULL
    )
    return NANOGPT_CACHE


def thread_env(threads: int, spin: bool = False) -> dict[str, str]:
    """The environment with ``threads`` OpenMP and MKL threads and one OpenMP wait policy for all.

    Without ``spin`` idle OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``, what ``seq2seq``
    sets unless told otherwise); with it they spin ~3 ms first, libgomp's own default, which
    ``GOMP_SPINCOUNT`` restores over any wait policy.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if spin:
        env["GOMP_SPINCOUNT"] = "300000"
    return env


def run_nanogpt(directory: Path, root: Path, max_iters: int, threads: int, spin: bool) -> dict:
    """nanoGPT's train.py with the README's CPU flags; its log parsed for times and losses."""
    out_dir = harness.CACHE / "runs" / "nanogpt"
    program = f"nanoGPT, {threads} thread" + "s" * (threads > 1)
    shutil.rmtree(out_dir, ignore_errors=True)
    command = [
        sys.executable, "train.py", *NANOGPT_ARGS, f"--max_iters={max_iters}",
        f"--lr_decay_iters={max_iters}", f"--out_dir={out_dir}",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(
        command,
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
        env=thread_env(threads, spin),
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"program": program, "error": done.stderr.strip().splitlines()[-1:]}
    iteration_ms = [
        float(ms) for ms in re.findall(r"^iter \d+: .* time ([\d.]+)ms", done.stdout, re.M)
    ]
    losses = re.findall(r"^step (\d+): train loss [\d.]+, val loss ([\d.]+)", done.stdout, re.M)
    loop = sum(iteration_ms) / 1000
    return {
        "program": program,
        "nanogpt_threads": threads,
        "iterations": len(iteration_ms),
        "wall_s": wall,
        "loop_s": loop,
        "ms_per_iter": 1000 * loop / max(len(iteration_ms), 1),
        "valid_loss": float(losses[-1][1]) if losses else None,
        "full_valid_loss": score_nanogpt(directory, out_dir, root),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="shared data folder (default: $SEQ2SEQ_DATA)")
    parser.add_argument("--nanogpt", help="nanoGPT checkout (default: $NANOGPT_DIR)")
    parser.add_argument("--precisions", default="fp32,auto", help="ours: train.precision values")
    parser.add_argument("--threads", type=int, default=2, help="cores for every run")
    parser.add_argument(
        "--nanogpt-threads",
        default="",
        help="also run nanoGPT with these thread counts (comma-separated), e.g. 1",
    )
    parser.add_argument("--max-iters", type=int, default=2000, help="iterations of every run")
    parser.add_argument(
        "--spin",
        action="store_true",
        help="idle OpenMP threads spin (libgomp's default) instead of sleeping, in every run",
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all runs")
    parser.add_argument("overrides", nargs="*", help="extra section.key=value overrides (ours)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    root = harness.data_root(args.data)
    input_txt = root / "tinyshakespeare" / "input.txt"
    if not input_txt.is_file():
        sys.exit(f"bench_gpt: {root} has no tinyshakespeare/input.txt")
    precisions = args.precisions.split(",")
    prepare(load_config(GPT_CONFIG, gpt_overrides(root, precisions[0], args.threads, 1, [])))
    checkout = args.nanogpt or os.environ.get("NANOGPT_DIR")
    nanogpt = prepare_nanogpt(Path(checkout), input_txt) if checkout else None
    if nanogpt is None:
        print("bench_gpt: NANOGPT_DIR is not set; running ours only", flush=True)
    info = harness.machine()
    info["omp_wait"] = (
        "spin (GOMP_SPINCOUNT=300000)"
        if args.spin
        else os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    )
    print(f"machine: {json.dumps(info)}", flush=True)
    rows: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        extra_threads = [int(t) for t in args.nanogpt_threads.split(",") if t]
        nanogpt_runs = [args.threads, *extra_threads] if nanogpt else []
        programs: list[str | int] = [*nanogpt_runs, *precisions]
        for program in programs if repeat % 2 == 0 else programs[::-1]:
            if isinstance(program, int):
                result = run_nanogpt(nanogpt, root, args.max_iters, program, args.spin)
            else:
                result = run_ours(
                    root, program, args.threads, args.max_iters, args.overrides, args.spin
                )
            result["load"] = round(harness.load_average(), 2)
            if "error" in result:
                print(f"{result['program']}: {result['error']}", flush=True)
                continue
            rows.append(result)
            full = result["full_valid_loss"]
            print(
                f"{result['program']}: {result['wall_s']:.1f} s wall, loop {result['loop_s']:.1f} s, "
                f"{result['ms_per_iter']:.1f} ms/iter, valid loss {result['valid_loss']:.4f} "
                f"(whole validation text {'-' if full is None else f'{full:.4f}'}), "
                f"load {result['load']}",
                flush=True,
            )
        this_round = rows[-len(programs) :]
        nanogpts = [r for r in this_round if "nanogpt_threads" in r]
        # The target compares with nanoGPT on the same cores; the fastest nanoGPT is shown too.
        reference = next((r for r in nanogpts if r["nanogpt_threads"] == args.threads), None)
        for row in this_round:
            if reference is not None and "nanogpt_threads" not in row:
                row["ratio"] = row["wall_s"] / reference["wall_s"]
                row["loop_ratio"] = row["loop_s"] / reference["loop_s"]
                row["best_ratio"] = row["wall_s"] / min(r["wall_s"] for r in nanogpts)
                theirs, ours = reference["full_valid_loss"], row["full_valid_loss"]
                no_worse = ours is not None and theirs is not None and ours <= theirs
                met = row["ratio"] <= TARGET_RATIO and no_worse
                row["target_met"] = "yes" if met else "no"
    columns = [
        ("program", "program"),
        ("iterations", "iterations"),
        ("wall_s", "wall s"),
        ("loop_s", "loop s"),
        ("ms_per_iter", "ms / iter"),
        ("valid_loss", "final valid loss (own sample)"),
        ("full_valid_loss", "whole validation text"),
        ("ratio", "wall / nanoGPT (same cores)"),
        ("loop_ratio", "loop / nanoGPT"),
        ("best_ratio", "wall / fastest nanoGPT"),
        ("load", "load"),
        ("target_met", f"<= {TARGET_RATIO}x, loss no worse"),
    ]
    print()
    print(harness.table(rows, columns))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
