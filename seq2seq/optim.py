"""Adam with the paper's settings; learning-rate schedules as pure ``step -> multiplier`` functions.

Steps count optimizer updates from 1: update ``u`` runs with ``train.lr * multiplier(u)``.

Schedules (``train.lr_schedule``):
  - ``noam``: ``d_model^-0.5 * min(u^-0.5, u * warmup^-1.5)`` (Vaswani et al. 2017, eq. 3), scaled
    by ``train.lr`` (1.0 reproduces the paper);
  - ``inverse_sqrt``: linear warmup to 1 at ``warmup`` then ``sqrt(warmup / u)`` (fairseq's shape),
    so ``train.lr`` is the peak rate;
  - ``cosine``: linear warmup to 1, then a half cosine down to ``min_lr / lr`` at ``max_steps``;
  - ``constant``: linear warmup to 1, then 1.

``train.cooldown`` (> 0) multiplies any of them by a ramp that falls linearly to ``min_lr`` over
the last fraction of the run (updates of ``max_steps``, or seconds of ``max_minutes``), so a run on
a wall-clock budget ends on a low rate without knowing in advance how many updates it will make
(the linear decay to zero of "budgeted training", Li et al. 2020).

Weight decay (only when ``train.weight_decay > 0``, which switches Adam to AdamW) applies to every
parameter with two or more dimensions: linear weights and embeddings (the embedding is also the
tied output projection, so it is a matrix like the others, as in nanoGPT). Biases and LayerNorm
gains are never decayed: shrinking them towards zero changes the function without limiting capacity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from seq2seq.config import ConfigError, TrainConfig


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """Adam (or AdamW when ``train.weight_decay > 0``) over the model's trainable parameters.

    Args:
        model: the unwrapped module (parameters are the same objects under DDP/compile).
        train: supplies ``lr``, ``adam_betas``, ``adam_eps`` and ``weight_decay``.

    Returns:
        The optimizer; its ``lr`` is the base rate that the scheduler multiplies.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    betas = tuple(train.adam_betas)
    # One fused kernel for all tensors instead of a dozen ops per tensor: ~4x faster steps on CPU,
    # where a small model's optimizer step is otherwise several percent of the update.
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )
    settings = {"lr": train.lr, "betas": betas, "eps": train.adam_eps, "fused": fused or None}
    if train.weight_decay <= 0.0:
        return torch.optim.Adam(params, **settings)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": train.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, **settings)


def noam(step: int, d_model: int, warmup: int) -> float:
    """``d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)``; peaks at ``step == warmup``."""
    step = max(step, 1)
    if warmup <= 0:
        return d_model**-0.5 * step**-0.5
    return d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def inverse_sqrt(step: int, warmup: int) -> float:
    """Linear warmup to 1.0 at ``warmup``, then ``sqrt(warmup / step)``."""
    step = max(step, 1)
    if step < warmup:
        return step / warmup
    return math.sqrt(max(warmup, 1) / step)


def cosine(step: int, warmup: int, max_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup to 1.0, then half a cosine to ``min_ratio`` at ``max_steps`` (then flat)."""
    step = max(step, 1)
    if step < warmup:
        return step / warmup
    span = max(max_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def constant(step: int, warmup: int) -> float:
    """Linear warmup to 1.0 at ``warmup``, then 1.0."""
    step = max(step, 1)
    return min(1.0, step / warmup) if warmup > 0 else 1.0


def schedule_function(train: TrainConfig, d_model: int, max_steps: int) -> Callable[[int], float]:
    """The multiplier for update ``u`` (1-based) chosen by ``train.lr_schedule``.

    Raises:
        ConfigError: ``cosine`` without a positive ``max_steps``.
    """
    if train.lr_schedule == "noam":
        return partial(noam, d_model=d_model, warmup=train.warmup_steps)
    if train.lr_schedule == "inverse_sqrt":
        return partial(inverse_sqrt, warmup=train.warmup_steps)
    if train.lr_schedule == "cosine":
        if max_steps <= 0:
            raise ConfigError("train.lr_schedule=cosine needs train.max_steps > 0")
        min_ratio = train.min_lr / train.lr if train.lr > 0 else 0.0
        return partial(cosine, warmup=train.warmup_steps, max_steps=max_steps, min_ratio=min_ratio)
    if train.lr_schedule == "constant":
        return partial(constant, warmup=train.warmup_steps)
    raise ConfigError(f"train.lr_schedule: unknown schedule {train.lr_schedule!r}")


def cooldown_factor(update: int, elapsed_seconds: float, train: TrainConfig) -> float:
    """The ramp for update ``update`` (1-based) that starts ``elapsed_seconds`` into the run.

    The run's progress is the larger of ``(update - 1) / max_steps`` and ``elapsed / max_minutes``
    (whichever limit ends it first); the ramp is 1 until ``1 - cooldown`` of the run has gone,
    then falls linearly to 0 at its end.
    """
    if train.cooldown <= 0:
        return 1.0
    done = 0.0
    if train.max_steps > 0:
        done = (update - 1) / train.max_steps
    if train.max_minutes > 0:
        done = max(done, elapsed_seconds / (train.max_minutes * 60.0))
    return min(1.0, max(0.0, (1.0 - done) / train.cooldown))


def apply_cooldown(optimizer: torch.optim.Optimizer, ramp: float, min_lr: float) -> None:
    """Scale the rates the scheduler has just set by ``ramp``, never below ``min_lr``.

    ``LambdaLR`` sets each rate afresh from its base on every step, so the ramp does not compound;
    the optimizer's state_dict holds the ramped rate, so a resume continues with it.
    """
    if ramp >= 1.0:
        return
    for group in optimizer.param_groups:
        if group["lr"] > min_lr:
            group["lr"] = max(min_lr, group["lr"] * ramp)


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainConfig, d_model: int, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose rate for update ``u`` is ``train.lr * multiplier(u)``.

    ``LambdaLR`` counts calls to ``scheduler.step()`` from 0, and the first optimizer update happens
    before the first ``scheduler.step()``, so its counter ``c`` maps to update ``c + 1``. Its
    ``state_dict`` holds only that counter and the base rates, so resuming restores it exactly.
    """
    multiplier = schedule_function(train, d_model, max_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda count: multiplier(count + 1))
