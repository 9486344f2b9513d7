"""The run directory's guards: one trainer at a time, and a resume that continues the same run.

``<train.out_dir>/.lock`` is held with ``flock`` by the process that trains there; the kernel
drops it when that process dies, so a lock file left by a killed run is taken over (with a
message naming the old pid). A resume (``train.resume``) picks the newest checkpoint that passes
its checksums and refuses to go on when checkpoints exist but none can be loaded, or when the
config differs from the one saved in that checkpoint in anything but :data:`MAY_CHANGE_ON_RESUME`.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from seq2seq.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    load_config_file,
    load_trainer_state,
    step_dirs,
)
from seq2seq.config import ConfigError, RunConfig

LOCK = ".lock"

# Settings that say how long, how often or where a run goes, not what it trains: changing them
# on resume continues the same run. ``decode.*`` only affects validation BLEU and translation.
MAY_CHANGE_ON_RESUME = frozenset(
    [f"train.{name}" for name in (
        "out_dir", "max_steps", "max_epochs", "max_minutes", "update_freq", "processes",
        "precision", "compile", "tf32", "device", "num_threads", "deterministic", "log_every",
        "eval_every", "eval_bleu", "eval_bleu_sentences", "patience", "save_every", "keep_last",
        "resume", "allow_config_change",
    )]
    + ["format_version"]
)  # fmt: skip
MAY_CHANGE_SECTIONS = ("decode.", "prepare.")


@contextmanager
def locked(out_dir: str | Path) -> Iterator[None]:
    """Hold ``<out_dir>/.lock`` (creating ``out_dir``) while the block runs.

    Raises:
        ConfigError: ``out_dir`` is a file, or another live process holds the lock (its pid named).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"train.out_dir: {out_dir} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole block
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(
            f"train.out_dir: {out_dir} is in use by another training process (pid {holder}, "
            f"holding {path}); wait for it to end or choose another train.out_dir"
        ) from None
    handle.seek(0)
    previous = handle.read().strip()
    if previous and previous != str(os.getpid()):
        print(
            f"{path}: taking over the lock left by process {previous}, which no longer runs",
            file=sys.stderr,
            flush=True,
        )
    _write_pid(handle, f"{os.getpid()}\n")
    try:
        yield
    finally:
        _write_pid(handle, "")  # a clean exit leaves no pid behind
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _write_pid(handle: Any, text: str) -> None:
    handle.seek(0)
    handle.truncate()
    handle.write(text)
    handle.flush()


def choose_resume(config: RunConfig) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from under ``train.resume`` and its loaded trainer state, after
    checking that it continues the same run.

    ``auto`` resumes from the newest loadable checkpoint, or starts when there is none at all;
    ``must`` insists on one; ``never`` starts from update 0 and first moves any old
    ``checkpoints/`` folder aside (``checkpoints.set-aside-<time>``) so that nothing is lost.

    Raises:
        CheckpointError: checkpoints exist but none passes its checks (they are listed), or the
            newest one's trainer state is malformed.
        ConfigError: ``must`` without a checkpoint, or a config that differs from the
            checkpoint's (the keys listed) without ``train.allow_config_change=true``.
    """
    tc = config.train
    out_dir = Path(tc.out_dir)
    found = step_dirs(out_dir)
    if tc.resume == "never":
        if found:
            aside = out_dir / f"checkpoints.set-aside-{time.strftime('%Y%m%d-%H%M%S')}"
            (out_dir / "checkpoints").rename(aside)
            print(f"train.resume=never: moved the old checkpoints to {aside}", flush=True)
        return None
    directory = find_resume_checkpoint(out_dir)
    if directory is None:
        if found:
            names = ", ".join(d.name for d in found)
            raise CheckpointError(
                f"{out_dir / 'checkpoints'}: no checkpoint can be resumed ({names} all fail "
                "their checks); repair or remove them, or set train.resume=never to start again "
                "from update 0 (the old checkpoints are then moved aside)"
            )
        if tc.resume == "must":
            raise ConfigError(f"train.resume=must but {out_dir} holds no checkpoint")
        return None
    state = load_trainer_state(directory)
    changes = config_changes(load_config_file(directory), config)
    if changes:
        listing = "; ".join(changes)
        if not tc.allow_config_change:
            raise ConfigError(
                f"{directory}: the config differs from the checkpoint's: {listing}; set "
                "train.allow_config_change=true to resume anyway, or use another train.out_dir"
            )
        print(f"warning: resuming {directory} with a changed config: {listing}", file=sys.stderr)
    return directory, state


def config_changes(saved: RunConfig, current: RunConfig) -> list[str]:
    """``key: old -> new`` for every setting that differs and may not change on resume."""
    old, new = _flatten(saved.to_dict()), _flatten(current.to_dict())
    changes = []
    for key in sorted(old.keys() | new.keys()):
        if key in MAY_CHANGE_ON_RESUME or key.startswith(MAY_CHANGE_SECTIONS):
            continue
        if old.get(key) != new.get(key):
            changes.append(f"{key}: {old.get(key)} -> {new.get(key)}")
    return changes


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
