"""Learning-rate schedules (formula, peak, resume) and optimizer parameter groups."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from seq2seq.config import ConfigError, TrainConfig
from seq2seq.optim import (
    apply_cooldown,
    build_optimizer,
    build_scheduler,
    constant,
    cooldown_factor,
    cosine,
    inverse_sqrt,
    noam,
)


def test_noam_rises_linearly_then_decays_as_inverse_sqrt():
    d_model, warmup = 512, 400
    peak = d_model**-0.5 * warmup**-0.5  # the value at the end of warmup (paper, eq. 3)
    assert noam(warmup, d_model, warmup) == pytest.approx(peak, rel=1e-12)
    for step in (1, 10, 100, 200):  # warmup: proportional to the step
        assert noam(step, d_model, warmup) == pytest.approx(peak * step / warmup, rel=1e-12)
        assert noam(2 * step, d_model, warmup) == pytest.approx(2 * noam(step, d_model, warmup))
    for step in (400, 401, 4000, 100_000):  # afterwards: proportional to step^-0.5
        assert noam(step, d_model, warmup) == pytest.approx(peak * (warmup / step) ** 0.5)
        assert noam(4 * step, d_model, warmup) == pytest.approx(noam(step, d_model, warmup) / 2)
    assert noam(warmup, 4 * d_model, warmup) == pytest.approx(peak / 2)  # and to d_model^-0.5


def test_noam_peaks_at_warmup():
    d_model, warmup = 512, 4000
    values = [noam(s, d_model, warmup) for s in range(1, 3 * warmup)]
    assert max(range(len(values)), key=values.__getitem__) + 1 == warmup
    assert noam(warmup, d_model, warmup) == pytest.approx(d_model**-0.5 * warmup**-0.5)
    assert noam(warmup, d_model, warmup) == pytest.approx(7.0e-4, rel=0.01)  # paper's peak


def test_inverse_sqrt_constant_and_cosine_shapes():
    assert inverse_sqrt(50, 100) == pytest.approx(0.5)
    assert inverse_sqrt(100, 100) == pytest.approx(1.0)
    assert inverse_sqrt(400, 100) == pytest.approx(0.5)
    assert constant(25, 100) == pytest.approx(0.25)
    assert constant(1000, 100) == 1.0 and constant(3, 0) == 1.0
    assert cosine(10, 10, 110) == pytest.approx(1.0)
    assert cosine(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def _model():
    return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8))


def test_scheduler_rate_per_update_and_resume():
    train = TrainConfig(lr=2.0, warmup_steps=10, lr_schedule="noam")
    model = _model()
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, d_model=64, max_steps=100)
    rates = []
    for _ in range(15):
        rates.append(optimizer.param_groups[0]["lr"])  # the rate this update runs with
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([2.0 * noam(u, 64, 10) for u in range(1, 16)])
    # Resume order as in train.py: optimizer state (holds the current lr), then scheduler counter.
    fresh_optimizer = build_optimizer(model, train)
    fresh = build_scheduler(fresh_optimizer, train, d_model=64, max_steps=100)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * noam(16, 64, 10))
    fresh_optimizer.step()
    fresh.step()
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(2.0 * noam(17, 64, 10))


def test_cooldown_ramp_follows_whichever_limit_ends_the_run_first():
    steps = TrainConfig(max_steps=100, max_minutes=0, cooldown=0.2)
    assert [cooldown_factor(u, 0.0, steps) for u in (1, 81, 91, 100)] == pytest.approx(
        [1.0, 1.0, 0.5, 0.05]
    )
    minutes = TrainConfig(max_steps=0, max_minutes=10, cooldown=0.5)
    assert cooldown_factor(10**6, 0.0, minutes) == 1.0  # no step limit: only the clock counts
    assert [cooldown_factor(1, s, minutes) for s in (0, 300, 450, 600, 700)] == pytest.approx(
        [1.0, 1.0, 0.5, 0.0, 0.0]
    )
    both = TrainConfig(max_steps=100, max_minutes=10, cooldown=0.5)
    assert cooldown_factor(91, 60.0, both) == pytest.approx(0.2)  # 90% of the updates done
    assert cooldown_factor(11, 540.0, both) == pytest.approx(0.2)  # 90% of the minutes gone
    assert cooldown_factor(100, 600.0, TrainConfig(max_steps=100, cooldown=0.0)) == 1.0


def test_cooldown_scales_the_scheduled_rate_down_to_min_lr_and_survives_a_resume():
    train = TrainConfig(lr=1.0, warmup_steps=0, lr_schedule="constant", min_lr=0.1)
    model = _model()
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, d_model=8, max_steps=0)
    optimizer.step()
    scheduler.step()
    apply_cooldown(optimizer, 0.5, train.min_lr)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    scheduler.step()  # the scheduler sets the rate afresh: the ramp does not compound
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1.0)
    apply_cooldown(optimizer, 0.01, train.min_lr)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)  # the floor
    fresh_optimizer = build_optimizer(model, train)
    fresh = build_scheduler(fresh_optimizer, train, d_model=8, max_steps=0)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(cooldown=1.5, max_steps=10), "between 0 and 1"),
        (dict(cooldown=0.2, max_steps=0, max_minutes=0), "max_steps or train.max_minutes"),
    ],
)
def test_cooldown_settings_are_checked(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings).validate()


def test_cosine_needs_max_steps():
    train = TrainConfig(lr=1e-3, lr_schedule="cosine")
    with pytest.raises(ConfigError, match="max_steps"):
        build_scheduler(build_optimizer(_model(), train), train, d_model=8, max_steps=0)


def test_optimizer_settings_and_weight_decay_groups():
    model = _model()
    plain = build_optimizer(model, TrainConfig(adam_betas=(0.9, 0.98), adam_eps=1e-9))
    assert type(plain) is torch.optim.Adam
    assert plain.defaults["betas"] == (0.9, 0.98) and plain.defaults["eps"] == 1e-9
    decayed = build_optimizer(model, TrainConfig(weight_decay=0.01))
    assert type(decayed) is torch.optim.AdamW
    by_decay = {g["weight_decay"]: g["params"] for g in decayed.param_groups}
    assert {tuple(p.shape) for p in by_decay[0.01]} == {(10, 8), (8, 8)}
    assert all(p.dim() == 1 for p in by_decay[0.0]) and len(by_decay[0.0]) == 3


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_fused_optimizer_takes_the_same_steps_as_the_reference(weight_decay):
    """The fused kernel is chosen on CPU and follows PyTorch's per-tensor Adam(W).

    Both optimizers get the same gradients (bounded away from zero, so that m / sqrt(v) is
    well-conditioned and rounding is not amplified through the model), so the only difference is
    the order and vectorisation of float32 arithmetic, which varies by CPU class. Per step, the
    update lr * m_hat / (sqrt(v_hat) + eps) is a handful of float32 operations, each off by at most
    half an ulp (2^-24 relative), and m, v carry the earlier steps' rounding; the parameter then
    takes one (two with decoupled weight decay) roundings of its own magnitude. The bound below
    sums those over the steps.
    """
    torch.manual_seed(0)
    fused_model, reference_model = _model(), _model()
    reference_model.load_state_dict(fused_model.state_dict())
    lr, steps = 1e-2, 5
    config = TrainConfig(lr=lr, weight_decay=weight_decay)
    fused = build_optimizer(fused_model, config)
    assert fused.defaults["fused"] is True
    twin = dict(zip(map(id, fused_model.parameters()), reference_model.parameters()))
    groups = [
        {"params": [twin[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"]}
        for g in fused.param_groups
    ]
    reference_type = torch.optim.AdamW if weight_decay else torch.optim.Adam
    reference = reference_type(
        groups, lr=lr, betas=config.adam_betas, eps=config.adam_eps, foreach=False
    )
    for _ in range(steps):
        for param, twin_param in zip(fused_model.parameters(), reference_model.parameters()):
            magnitude = torch.empty_like(param).uniform_(0.1, 1.0)
            gradient = magnitude * torch.randint_like(param, 0, 2).mul_(2).sub_(1)
            param.grad, twin_param.grad = gradient.clone(), gradient.clone()
        fused.step()
        reference.step()
    # |m_hat / sqrt(v_hat)| <= sqrt(max g^2 / min g^2) over the steps: at most 1 / 0.1 here.
    update_bound = lr * 10.0
    unit = 2.0**-24
    for a, b in zip(fused_model.parameters(), reference_model.parameters()):
        magnitude = max(a.abs().max().item(), b.abs().max().item()) + steps * update_bound
        per_step = 2 * unit * magnitude + 16 * steps * unit * update_bound
        torch.testing.assert_close(a, b, rtol=0, atol=steps * per_step)
