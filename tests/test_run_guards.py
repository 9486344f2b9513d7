"""Run-directory guards (issue 12): one trainer per out_dir, resumes that refuse a different or
lost run, start-time checks, clear one-line errors, and interruptions that change nothing."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from helpers import toy_run_config, write_toy_task
from safetensors.torch import load_file

from seq2seq import train as train_module
from seq2seq.checkpoint import load_trainer_state, step_dirs
from seq2seq.config import config_from_dict
from seq2seq.prepare import prepare


def _raw(out_dir: Path, task: tuple[Path, Path], **train) -> dict:
    corpus, prepared = task
    return toy_run_config(out_dir, prepared, corpus, **{"num_threads": 1, **train})


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("guards")
    # five words; each target is its source upper-cased, in the same order
    write_toy_task(root / "corpus", 96, 12, words=("ab", "cd", "ef", "gab", "hic"), reverse=False)
    prepare(config_from_dict(_raw(root / "unused", (root / "corpus", root / "prepared"))))
    return root / "corpus", root / "prepared"


def _yaml(tmp_path: Path, task, **train) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path / "run", task, **train)))
    return path


def _cli_error(capsys, argv: list[str]) -> str:
    """Run ``seq2seq train``; assert exit 2 and one error line without traceback; return it."""
    assert train_module.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("seq2seq train: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _train(task, out_dir: Path, **train) -> dict:
    return train_module.train(config_from_dict(_raw(out_dir, task, **train)))


# ----------------------------------------------------------------------------- one trainer per dir

_HOLD_LOCK = """
import sys, time
from seq2seq.rundir import locked
with locked(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_a_second_trainer_on_the_same_out_dir_is_refused_and_a_dead_ones_lock_taken_over(
    task, tmp_path, capsys
):
    config = _yaml(tmp_path, task, max_steps=1)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        line = _cli_error(capsys, [str(config)])
        assert str(tmp_path / "run") in line and f"pid {holder.pid}" in line
        assert not (tmp_path / "run" / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()
    assert train_module.main([str(config)]) == 0  # the dead holder's lock is taken over
    err = capsys.readouterr().err
    assert f"taking over the lock left by process {holder.pid}" in err
    assert (tmp_path / "run" / ".lock").read_text() == ""  # released on a clean exit


# ----------------------------------------------------------------------------- resume guards


def test_no_loadable_checkpoint_stops_instead_of_restarting(task, tmp_path, capsys):
    config = _yaml(tmp_path, task, max_steps=2, save_every=1)
    assert train_module.main([str(config)]) == 0
    for directory in step_dirs(tmp_path / "run"):
        weights = directory / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-8])
    capsys.readouterr()
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        line = _cli_error(capsys, [str(config), "train.max_steps=4"])
    assert "step_1, step_2" in line and "train.resume=never" in line
    assert [d.name for d in step_dirs(tmp_path / "run")] == ["step_1", "step_2"]  # untouched
    capsys.readouterr()
    assert train_module.main([str(config), "train.max_steps=1", "train.resume=never"]) == 0
    assert "moved the old checkpoints to" in capsys.readouterr().out
    aside = list((tmp_path / "run").glob("checkpoints.set-aside-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].glob("step_*")) == [
        "step_1",
        "step_2",
    ]
    assert [d.name for d in step_dirs(tmp_path / "run")] == ["step_1"]


def test_resume_must_needs_a_checkpoint(task, tmp_path, capsys):
    line = _cli_error(capsys, [str(_yaml(tmp_path, task, max_steps=1)), "train.resume=must"])
    assert "train.resume=must" in line and str(tmp_path / "run") in line


def test_resume_with_a_different_config_stops_and_lists_the_keys(task, tmp_path, capsys):
    config = _yaml(tmp_path, task, max_steps=2)
    assert train_module.main([str(config)]) == 0
    capsys.readouterr()
    line = _cli_error(capsys, [str(config), "model.n_heads=4", "train.seed=3"])
    assert "model.n_heads: 2 -> 4" in line and "train.seed: 1 -> 3" in line
    assert "train.allow_config_change=true" in line
    assert [d.name for d in step_dirs(tmp_path / "run")] == ["step_2"]
    assert "n_heads: 2" in (tmp_path / "run" / "config.yaml").read_text()  # not overwritten
    # Settings that only say how long, how often or where may change.
    changed = ["train.max_steps=3", "train.log_every=7", "train.patience=4", "decode.beam_size=2"]
    assert train_module.main([str(config), *changed]) == 0
    assert "resumed from" in capsys.readouterr().out
    override = [str(config), "model.n_heads=4", "train.max_steps=4"]
    assert train_module.main([*override, "train.allow_config_change=true"]) == 0
    assert "model.n_heads: 2 -> 4" in capsys.readouterr().err  # said, then done
    assert load_trainer_state(tmp_path / "run" / "checkpoints" / "step_4")["counters"]["step"] == 4


# ----------------------------------------------------------------------------- start-time checks


@pytest.mark.parametrize("key", ["max_source_len", "max_target_len"])
def test_max_positions_smaller_than_the_data_is_refused_at_start(task, tmp_path, capsys, key):
    config = _yaml(tmp_path, task, max_steps=1)
    limits = ["data.max_source_len=32", "data.max_target_len=32", f"data.{key}=40"]
    line = _cli_error(capsys, [str(config), "model.max_positions=32", *limits])
    assert "model.max_positions (32)" in line and f"data.{key} (40" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model=5"], "model:"),
        (["model=abc"], "model:"),
        (["train="], "train:"),
        (["data=0"], "data:"),
        (["train.out_dir="], "train.out_dir"),
        (["train.eval_bleu=true", "train.eval_bleu_sentences=0"], "train.eval_bleu_sentences"),
        (["train.device=tpu"], "train.device"),
        (["train.device=cuda:7"], "train.device"),
        (["train.resume=sometimes"], "train.resume"),
    ],
)
def test_bad_overrides_give_one_line_naming_the_key(task, tmp_path, capsys, overrides, key):
    line = _cli_error(capsys, [str(_yaml(tmp_path, task, max_steps=1)), *overrides])
    assert line.startswith(f"seq2seq train: error: {key}"), line


def test_an_out_dir_that_is_a_file_is_refused(task, tmp_path, capsys):
    (tmp_path / "run").write_text("precious\n")
    line = _cli_error(capsys, [str(_yaml(tmp_path, task, max_steps=1))])
    assert f"{tmp_path / 'run'} exists and is not a directory" in line
    assert (tmp_path / "run").read_text() == "precious\n"


# ----------------------------------------------------------------------------- interruptions


def _sigterm_in_update(monkeypatch, update: int):
    """Send this process SIGTERM during the forward of training update ``update`` (one batch per
    update); return the real forward, to put back."""
    real_forward, calls = train_module._forward, []

    def terminated(net, batch):
        if net.training:
            calls.append(1)
            if len(calls) == update:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(net, batch)

    monkeypatch.setattr(train_module, "_forward", terminated)
    return real_forward


def test_sigterm_then_resume_stops_at_the_update_of_an_uninterrupted_run(
    task, tmp_path, monkeypatch
):
    # lr ~0 never improves: evaluations at 3 (best), 6 and 9 (misses) -> patience 2 stops at 9.
    settings = dict(
        max_steps=100, eval_every=3, save_every=0, patience=2, lr_schedule="constant", lr=1e-12
    )
    assert _train(task, tmp_path / "straight", **settings)["step"] == 9

    real_forward = _sigterm_in_update(monkeypatch, 4)
    assert _train(task, tmp_path / "run", **settings)["step"] == 4
    saved = load_trainer_state(tmp_path / "run" / "checkpoints" / "step_4")["counters"]
    assert saved["bad_evals"] == 0  # no extra evaluation was counted
    monkeypatch.setattr(train_module, "_forward", real_forward)
    assert _train(task, tmp_path / "run", **settings)["step"] == 9


def test_max_minutes_is_the_runs_budget_across_resumes(task, tmp_path, monkeypatch):
    clock = [1000.0]
    real_step = train_module.train_step

    def ten_seconds_an_update(run, batches, votes=None):
        clock[0] += 10.0
        return real_step(run, batches, votes)

    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(train_module, "train_step", ten_seconds_an_update)
    # 60 s at 10 s an update: the vote after update 7 (70 s) stops the run.
    assert _train(task, tmp_path / "straight", max_steps=100, max_minutes=1)["step"] == 7
    assert _train(task, tmp_path / "run", max_steps=3, max_minutes=1)["step"] == 3
    saved = load_trainer_state(tmp_path / "run" / "checkpoints" / "step_3")["counters"]
    assert saved["elapsed_seconds"] == 30.0
    assert _train(task, tmp_path / "run", max_steps=100, max_minutes=1)["step"] == 7


def _recording_rates(monkeypatch, clock: list[float] | None = None) -> list[float]:
    """Record each update's rate; with ``clock``, every update also takes 10 fake seconds."""
    rates, real_step = [], train_module.train_step

    def step(run, batches, votes=None):
        if clock is not None:
            clock[0] += 10.0
        result = real_step(run, batches, votes)
        rates.append(result.lr)
        return result

    monkeypatch.setattr(train_module, "train_step", step)
    if clock is not None:
        fake_time = types.SimpleNamespace(monotonic=lambda: clock[0])
        monkeypatch.setattr(train_module, "time", fake_time)
    return rates


def test_cooldown_over_a_time_budget_ramps_the_rate_down_from_the_seconds_trained(
    task, tmp_path, monkeypatch
):
    rates = _recording_rates(monkeypatch, clock=[1000.0])
    lr = 3e-3
    settings = dict(lr_schedule="constant", lr=lr, warmup_steps=0, max_steps=0)
    # 120 s, the last quarter cooling down: update u starts 10 (u - 1) s into the run, so updates
    # 1-10 run at the full rate, 11-13 (starting at 100, 110, 120 s) at 2/3, 1/3 and 0 of it,
    # and the vote after update 13 (130 s) stops the run.
    result = _train(task, tmp_path / "run", max_minutes=2, cooldown=0.25, **settings)
    assert result["step"] == 13
    assert rates == pytest.approx([lr] * 10 + [lr * 2 / 3, lr / 3, 0.0], rel=1e-12, abs=0)


def test_cooldown_over_max_steps_resumes_exactly(task, tmp_path, monkeypatch):
    lr = 3e-3
    settings = dict(lr_schedule="constant", lr=lr, warmup_steps=0, max_steps=10, cooldown=0.5)
    rates = _recording_rates(monkeypatch)
    assert _train(task, tmp_path / "straight", **settings)["step"] == 10
    ramp = [1.0] * 6 + [0.8, 0.6, 0.4, 0.2]  # (1 - (u - 1) / 10) / 0.5, at most 1
    assert rates == pytest.approx([lr * r for r in ramp], rel=1e-12, abs=0)

    rates.clear()
    real_forward = _sigterm_in_update(monkeypatch, 7)
    assert _train(task, tmp_path / "run", **settings)["step"] == 7
    monkeypatch.setattr(train_module, "_forward", real_forward)
    assert _train(task, tmp_path / "run", **settings)["step"] == 10
    assert rates == pytest.approx([lr * r for r in ramp], rel=1e-12, abs=0)
    straight, resumed = (
        load_file(str(tmp_path / run / "checkpoints" / "step_10" / "model.safetensors"))
        for run in ("straight", "run")
    )
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_a_full_disk_during_a_save_is_one_line_naming_the_path(task, tmp_path, capsys, monkeypatch):
    def no_space(out_dir, step, *args, **kwargs):
        path = Path(out_dir) / "checkpoints" / f"step_{step}.tmp-1" / "model.safetensors"
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(train_module, "save_training_checkpoint", no_space)
    line = _cli_error(capsys, [str(_yaml(tmp_path, task, max_steps=2, save_every=1))])
    assert str(tmp_path / "run" / "checkpoints" / "step_1.tmp-1") in line
    assert os.strerror(errno.ENOSPC) in line
