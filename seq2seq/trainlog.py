"""Training progress lines and TensorBoard scalars, written by rank 0.

A line comes every ``train.log_every`` updates, and also whenever ``LOG_SECONDS`` have passed since
the previous one, so that a run with slow updates (a large model, a big ``update_freq``) is never
silent for long whatever ``log_every`` is (0 = the time-based lines only).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

LOG_SECONDS = 30.0  # the longest silence between two progress lines


@dataclass
class Window:
    """Training figures since the last line; ``start`` excludes time spent evaluating and saving."""

    start: float
    loss: float = 0.0  # sums over target tokens
    nll: float = 0.0
    tokens: float = 0.0
    updates: int = 0


class TrainLog:
    """Progress of one training run: one instance per process, silent except on rank 0.

    Args:
        out_dir: the run's folder (TensorBoard events go to ``out_dir/tensorboard``), or None for
            a process that does not log (ranks > 0).
        log_every: updates between lines (0 = only the time-based ones).
        max_steps: the run's update limit (0 = none), for the ETA.
        max_minutes: the run's time budget (0 = none), for the ETA.
    """

    def __init__(
        self, out_dir: Path | None, log_every: int, max_steps: int, max_minutes: float
    ) -> None:
        self.enabled = out_dir is not None
        self.log_every, self.max_steps, self.max_minutes = log_every, max_steps, max_minutes
        now = time.monotonic()
        self.window = Window(start=now)
        self.last_line = now
        self.last_loss = math.nan  # the loss of the last line written
        self.writer: SummaryWriter | None = None
        if out_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # slow import; rank 0 only

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def add(self, loss: float, nll: float, tokens: float) -> None:
        """Count one update: its loss and NLL summed over its ``tokens`` target tokens."""
        window = self.window
        window.loss, window.nll = window.loss + loss, window.nll + nll
        window.tokens, window.updates = window.tokens + tokens, window.updates + 1

    def due(self, step: int) -> bool:
        """Whether update ``step`` gets a line: on the ``log_every`` cadence or after a silence."""
        if not self.enabled:
            return False
        on_cadence = self.log_every > 0 and step % self.log_every == 0
        return on_cadence or time.monotonic() - self.last_line >= LOG_SECONDS

    def train_line(
        self, step: int, epoch: int, lr: float, grad_norm: float, elapsed: float
    ) -> None:
        """Print (and write to TensorBoard) the window's figures, then start a new window.

        ``elapsed`` is the run's time trained so far (all resumes together), for the ETA.
        """
        now = time.monotonic()
        window = self.window
        tokens = max(window.tokens, 1.0)
        loss, nll = window.loss / tokens, window.nll / tokens
        speed = window.tokens / max(now - window.start, 1e-9)
        seconds_per_update = (now - window.start) / max(window.updates, 1)
        remaining = []
        if self.max_steps:
            remaining.append((self.max_steps - step) * seconds_per_update)
        if self.max_minutes:
            remaining.append(self.max_minutes * 60 - elapsed)
        eta = f" | eta {duration(min(remaining))}" if remaining else ""
        print(
            f"update {step} | epoch {epoch} | loss {loss:.3f} | nll {nll:.3f} | "
            f"ppl {math.exp(min(nll, 50.0)):.2f} | lr {lr:.3g} | gnorm {grad_norm:.3f} | "
            f"{speed:,.0f} tok/s{eta}",
            flush=True,
        )
        if self.writer is not None:
            scalars = dict(loss=loss, nll=nll, lr=lr, grad_norm=grad_norm, tok_per_s=speed)
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step)
        self.window, self.last_line, self.last_loss = Window(start=now), now, loss

    def eval_line(self, step: int, metrics: dict[str, float], best: float | None) -> None:
        """Print (and write to TensorBoard) the validation figures of update ``step``."""
        if not self.enabled:
            return
        text = " | ".join(f"{name} {value:.3f}" for name, value in metrics.items())
        print(f"update {step} | valid | {text} | best {best:.3f}", flush=True)
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"valid/{name.removeprefix('valid_')}", value, step)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluating, saving) does not count towards tokens/s."""
        began = time.monotonic()
        try:
            yield
        finally:
            self.window.start += time.monotonic() - began

    @property
    def train_loss(self) -> float:
        """Loss per target token since the last line, else that of the last line."""
        window = self.window
        return window.loss / window.tokens if window.tokens else self.last_loss

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def duration(seconds: float) -> str:
    """``h:mm:ss``; negative durations read as 0."""
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
