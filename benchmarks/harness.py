"""Plumbing shared by the benchmark scripts: data, isolated worker runs, machine facts, tables.

Each measured run happens in a fresh Python process (``run_worker``) so that its peak resident
memory (``VmHWM``, see ``max_rss_mib``) is its own and no allocator or thread-pool state leaks
between runs.
The worker prints one line ``RESULT {json}`` which the parent parses.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache"
MULTI30K_CONFIG = REPO / "recipes" / "configs" / "multi30k.yaml"
RESULT_PREFIX = "RESULT "


def data_root(path: str | None) -> Path:
    """The shared data folder: ``--data`` or ``$SEQ2SEQ_DATA``; exits with a message if neither."""
    value = path or os.environ.get("SEQ2SEQ_DATA")
    if not value:
        sys.exit("benchmark: pass --data DIR or set SEQ2SEQ_DATA to the folder holding multi30k/")
    root = Path(value)
    if not (root / "multi30k").is_dir():
        sys.exit(f"benchmark: {root} has no multi30k/ folder")
    return root


def multi30k_overrides(root: Path, cache: Path = CACHE) -> list[str]:
    """Overrides turning the Multi30k recipe config into the benchmark's (joint BPE 8k)."""
    return [
        f"data.path={root / 'multi30k'}",
        f"prepare.out_dir={cache / 'multi30k_bpe8000'}",
        "data.vocab_size=8000",
        "data.joint_vocab=true",
        f"train.out_dir={cache / 'runs' / 'multi30k'}",
    ]


def load_average() -> float:
    return os.getloadavg()[0]


def max_rss_mib() -> float:
    """Peak resident memory of this process alone: Linux ``VmHWM`` (``ru_maxrss`` elsewhere).

    Not ``ru_maxrss`` on Linux: a child's starts at its parent's peak (Linux carries it across
    fork and exec), so in a worker spawned by a large parent it is a floor, not the worker's own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers  # noqa: PLC0415 - optional; the scripts that call this need it

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load": round(load_average(), 2),
    }


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 1.5) -> float:
    """Best observed FLOP/s of an ``n x n`` by ``n x n`` matmul in ``dtype`` (several windows).

    In float32 on a CPU where training runs its linear layers on oneDNN rather than MKL
    (``seq2seq.kernels.onednn_float32_linear_is_faster``), the faster of the two libraries: the
    peak an MFU figure divides by is the machine's, not one library's.
    """
    from seq2seq import kernels

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    products: list[Callable[[], Any]] = [lambda: a @ b]
    if dtype == torch.float32 and kernels.onednn_float32_linear_is_faster():
        products.append(lambda: kernels._onednn_linear(a, b.t(), None))
    best = 0.0
    for product in products:
        for _ in range(2):
            product()
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            for _ in range(3):
                product()
            best = max(best, 3 * 2 * n**3 / (time.perf_counter() - start))
    return best


def parser(doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line, described by its docstring's first paragraph, with the options
    every benchmark takes: ``--data``, ``--json`` and the hidden ``--worker`` of
    :func:`run_worker`."""
    command_line = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    command_line.add_argument("--data", help="shared data folder (default: $SEQ2SEQ_DATA)")
    command_line.add_argument("--json", help="also write the results to this file")
    command_line.add_argument("--worker", help=argparse.SUPPRESS)
    return command_line


def ran_as_worker(args: argparse.Namespace, worker: Callable[[dict[str, Any]], None]) -> bool:
    """Worker side of :func:`run_worker`: with ``--worker JSON``, run ``worker(settings)`` and
    return True (the script then exits); otherwise False (this is the parent)."""
    if not args.worker:
        return False
    worker(json.loads(args.worker))
    return True


def run_worker(
    script: Path, settings: dict[str, Any], timeout: float = 1800, as_cli: bool = False
) -> dict[str, Any]:
    """Run ``script --worker JSON`` in a fresh interpreter; return its ``RESULT`` dict.

    ``as_cli``: in the process the ``seq2seq`` command would give it (tcmalloc preloaded where
    installed, see ``seq2seq/__main__.py``). The worker's stderr passes through; a failed worker
    gives ``{"error": ...}``.
    """
    from seq2seq.__main__ import tcmalloc_environment  # noqa: PLC0415

    env = dict(os.environ)
    if as_cli:
        env = tcmalloc_environment(env) or env
    command = [sys.executable, str(script), "--worker", json.dumps(settings)]
    done = subprocess.run(
        command, stdout=subprocess.PIPE, text=True, timeout=timeout, cwd=REPO, check=False, env=env
    )
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
        print(line)
    return {"error": f"worker exited with {done.returncode}"}


def report(result: dict[str, Any]) -> None:
    """Worker side: print the result line (peak RSS added) for :func:`run_worker`."""
    result["max_rss_mib"] = round(max_rss_mib(), 1)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A Markdown table of ``rows`` with ``(key, heading)`` columns."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def per_implementation(impls: list[str], fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """:func:`table` columns ``({impl}_{key}, "{ours|HF} {heading}")``, fields within each
    implementation (``"ours"``, ``"hf"``)."""
    columns = []
    for impl in impls:
        label = "ours" if impl == "ours" else "HF"
        columns += [(f"{impl}_{key}", f"{label} {heading}") for key, heading in fields]
    return columns


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
