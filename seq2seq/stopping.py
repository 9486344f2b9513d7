"""When training stops: the run's limits, a stop requested by a signal, patience.

The first SIGINT/SIGTERM only asks: the loop finishes the update in flight, saves and exits; a
second one interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from seq2seq.config import TrainConfig
from seq2seq.trainsetup import Progress

STOP_REQUESTED = "stop requested (signal); resume with the same command"


def finished(
    progress: Progress, tc: TrainConfig, signal_votes: float = 0.0, time_votes: float = 0.0
) -> str | None:
    """Why training stops at this point, or None to go on (the run's own ends come first)."""
    if tc.max_steps and progress.step >= tc.max_steps:
        return f"reached train.max_steps={tc.max_steps}"
    if tc.max_epochs and progress.epoch_done and progress.epoch >= tc.max_epochs:
        return f"reached train.max_epochs={tc.max_epochs}"
    if time_votes:
        return f"reached train.max_minutes={tc.max_minutes:g}"
    if signal_votes:
        return STOP_REQUESTED
    return None


def update_best(progress: Progress, metrics: dict[str, float], best_metric: str) -> bool:
    """Record an improvement of ``best_metric`` (lower loss, higher BLEU); count the misses."""
    value = metrics["valid_loss"] if best_metric == "valid_loss" else metrics["bleu"]
    best = progress.best
    better = best is None or (value < best if best_metric == "valid_loss" else value > best)
    if better:
        progress.best, progress.bad_evals = value, 0
    else:
        progress.bad_evals += 1
    return better


@contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """An event set by the first SIGINT/SIGTERM while inside; the old handlers come back after.

    Outside the main thread (where no handler can be installed) the event is never set.
    """
    stop = threading.Event()

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"signal {signum}: finishing this update, then saving and stopping", flush=True)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
