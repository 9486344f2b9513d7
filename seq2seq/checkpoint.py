"""Self-contained checkpoint directories: what goes in them, loading them, resume lookup.

A *model directory* holds everything needed to decode, and a *training checkpoint* adds what is
needed to resume exactly::

    model.safetensors    the unwrapped module's weights (a tied matrix is stored once)
    config.yaml          the full RunConfig, with format_version
    tokenizer/           Tokenizer.save output
    trainer_state.pt     optimizer, scheduler, scaler, counters, RNG states (training only);
                         tensors and plain containers only, so torch.load(weights_only=True) reads it
    checksums.json       sha256 of every other file; every file must be listed, and a symlink
                         anywhere inside the directory is refused (nothing outside it is read)

A directory is written under ``<name>.tmp-XXXX`` next to its final place, fsynced and renamed, so a
crash mid-write never leaves a half-written ``<name>``; pruning renames a directory away before
deleting it, so a kill mid-delete leaves no half-deleted ``step_<n>`` either (such leftovers are
removed by the next save). A run keeps ``<out_dir>/checkpoints/step_<n>/`` plus the pointer files
``last`` and ``best`` (each holds a directory name, written atomically by
:func:`seq2seq.textio.atomic_write_text`). Weights with a NaN or Inf are never saved, and
``trainer_state.pt`` is read with ``weights_only=True``, so a planted pickle payload runs no code.

The writing and verifying of whole directories (temp dir + rename, checksums, no symlinks, file
modes, full-disk messages) lives in :mod:`seq2seq.directory`; this module knows what goes in them.
Averaging checkpoints into a new model directory (``seq2seq average``) is :mod:`seq2seq.average`.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from seq2seq.config import (
    FORMAT_VERSION,
    ConfigError,
    DecodeConfig,
    RunConfig,
    config_from_dict,
    save_config,
)

# Some re-exported, so that the checkpoint API reads as it did before seq2seq.directory took them.
from seq2seq.directory import (  # noqa: F401
    CHECKSUMS,
    CheckpointError,
    CheckpointWriteError,
    check_new_output,
    first_line,
    verify_checksums,
    write_directory,
    writing_to,
)
from seq2seq.hardware import resolve_device
from seq2seq.model import build_model
from seq2seq.textio import atomic_write_text, remove_stale_temporaries
from seq2seq.tokenizer import Tokenizer, TokenizerError

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer"
TRAINER_STATE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_LEFTOVER = re.compile(r"^step_\d+\.(tmp|old|del)-")  # what a killed save or prune leaves behind
# What train.py's resume reads from trainer_state.pt (load_trainer_state(..., required=...)).
TRAINER_STATE_KEYS = ("optimizer", "scheduler", "scaler", "counters", "rng")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------- writing


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    config: RunConfig,
    tokenizer: Tokenizer,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a model directory (plus ``trainer_state.pt`` when given) atomically.

    Args:
        directory: final location; replaced if it exists.
        model: the model, possibly wrapped; its unwrapped state dict is saved.
        config: the run's full configuration.
        tokenizer: saved into ``tokenizer/``.
        trainer_state: resume state (plain containers of tensors/numbers/strings) or None.

    Returns:
        The directory path.

    Raises:
        CheckpointError: a weight holds NaN or Inf (nothing is written).
    """
    bad = [k for k, v in unwrap_model(model).state_dict().items() if not v.isfinite().all()]
    if bad:
        raise CheckpointError(
            f"{directory}: refusing to save non-finite (NaN/Inf) weights: {', '.join(bad[:5])}"
        )

    def write(tmp: Path) -> None:
        metadata = {"format_version": str(FORMAT_VERSION)}
        with writing_to(tmp / WEIGHTS):
            save_safetensors_model(unwrap_model(model), str(tmp / WEIGHTS), metadata=metadata)
        with writing_to(tmp / CONFIG):
            save_config(config, tmp / CONFIG)
        with writing_to(tmp / TOKENIZER):
            tokenizer.save(tmp / TOKENIZER)
        if trainer_state is not None:
            with writing_to(tmp / TRAINER_STATE):
                torch.save(trainer_state, tmp / TRAINER_STATE)

    return write_directory(Path(directory), write)


# ----------------------------------------------------------------------------- reading


def load_config_file(directory: str | Path) -> RunConfig:
    """The RunConfig stored in a checkpoint directory.

    Raises:
        CheckpointError: unreadable file or a format_version newer than this code.
    """
    path = Path(directory) / CONFIG
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise CheckpointError(f"{path}: cannot read config: {error}") from error
    if not isinstance(raw, dict):
        raise CheckpointError(
            f"{path}: malformed config: expected a mapping of sections, got {type(raw).__name__}"
        )
    version = raw.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(
            f"{path}: format_version must be an integer, got {version!r} ({type(version).__name__})"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} is newer than this code ({FORMAT_VERSION})"
        )
    try:
        return config_from_dict(raw)
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from error


def load_weights(model: nn.Module, directory: str | Path) -> None:
    """Copy ``model.safetensors`` into ``model`` (strict: every key must match).

    Raises:
        CheckpointError: missing file or mismatching keys/shapes.
    """
    path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file is missing")
    try:
        load_safetensors_model(unwrap_model(model), str(path), strict=True)
    except (RuntimeError, OSError, SafetensorError) as error:
        raise CheckpointError(f"{path}: cannot load weights: {first_line(error)}") from error


def load_model(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Tokenizer, RunConfig]:
    """Rebuild the model from ``config.yaml``, load its weights and tokenizer, after checksums.

    Args:
        directory: a model directory or training checkpoint.
        device: where the model's parameters go: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.

    Returns:
        ``(model, tokenizer, config)`` with the model in eval mode.

    Raises:
        CheckpointError: a missing or corrupt file (named in the message).
        ValueError: a device this machine does not have (see ``hardware.resolve_device``).
    """
    directory = Path(directory)
    device = resolve_device(str(device))
    verify_checksums(directory)
    config = load_config_file(directory)
    try:
        tokenizer = Tokenizer.load(directory / TOKENIZER)
    except TokenizerError as error:
        raise CheckpointError(str(error)) from error
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    model.to(device)
    load_weights(model, directory)
    return model.eval(), tokenizer, config


def load_for_inference(
    directory: str | Path,
    device: str = "auto",
    decode_overrides: Mapping[str, Any] | None = None,
) -> tuple[nn.Module, Tokenizer, RunConfig, str]:
    """What a decoding command starts from: the device resolved, the model loaded onto it, and
    the checkpoint's decode settings with the command line's values put over them.

    Args:
        directory: a model directory or training checkpoint.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available, else CPU),
            resolved by :func:`seq2seq.hardware.resolve_device`.
        decode_overrides: ``DecodeConfig`` field -> value; a None value means "not given" and
            keeps the checkpoint's setting.

    Returns:
        ``(model, tokenizer, config, device)``: the model in eval mode, ``config.decode`` with the
        overrides applied and validated, and the resolved device name.

    Raises:
        CheckpointError: a missing or corrupt file (named in the message).
        ConfigError: an override that is not a decode setting, or an invalid value; or a
            device this machine does not have (the message quotes it).
    """
    try:
        resolved = resolve_device(str(device))
    except ValueError as error:
        raise ConfigError(f"--device: {error}") from None
    # "auto" and "cuda" name the default device: report it as "cuda" (or "cpu"), as before.
    plain = str(device).strip() in ("auto", "cuda", "cpu") and resolved.index in (None, 0)
    device = resolved.type if plain else str(resolved)
    overrides = {k: v for k, v in (decode_overrides or {}).items() if v is not None}
    fields = {field.name for field in dataclasses.fields(DecodeConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"decode.{unknown[0]}: no such decode setting")
    model, tokenizer, config = load_model(directory, device=device)
    decode = dataclasses.replace(config.decode, **overrides)
    decode.validate()
    return model, tokenizer, dataclasses.replace(config, decode=decode), device


def load_trainer_state(directory: str | Path, required: Sequence[str] = ()) -> dict[str, Any]:
    """``trainer_state.pt`` read with ``weights_only=True`` (no code runs from the file).

    Args:
        directory: a training checkpoint.
        required: top-level keys that must be present (train's resume passes
            :data:`TRAINER_STATE_KEYS`).

    Raises:
        CheckpointError: the file is missing, truncated, not a dict holding ``required``, or
            holds objects other than tensors and plain containers (e.g. a pickle payload that
            would run code; it is not run).
    """
    path = Path(directory) / TRAINER_STATE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused: holds objects that weights_only=True does not allow (untrusted "
            f"pickle content, not executed): {first_line(error)}"
        ) from error
    except (OSError, RuntimeError, EOFError, ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: cannot load trainer state: {first_line(error)}") from error
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: malformed trainer state: expected a dict, got {type(state).__name__}"
        )
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path}: malformed trainer state: no {', '.join(missing)}")
    return state


# ----------------------------------------------------------------------------- run directories


def step_dirs(out_dir: str | Path) -> list[Path]:
    """``<out_dir>/checkpoints/step_<n>`` directories, oldest first (temp dirs never match)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return [path for _, path in sorted(found) if path.is_dir()]


def read_pointer(out_dir: str | Path, name: str) -> Path | None:
    """The checkpoint that ``<out_dir>/checkpoints/<name>`` (``last`` or ``best``) points to."""
    pointer = Path(out_dir) / "checkpoints" / name
    if not pointer.is_file():
        return None
    target = pointer.parent / pointer.read_text().strip()
    return target if target.is_dir() else None


def write_pointer(out_dir: str | Path, name: str, target: Path) -> None:
    """Atomically point ``<out_dir>/checkpoints/<name>`` at ``target`` (a sibling directory)."""
    atomic_write_text(Path(out_dir) / "checkpoints" / name, target.name + "\n")


def save_training_checkpoint(
    out_dir: str | Path,
    step: int,
    model: nn.Module,
    config: RunConfig,
    tokenizer: Tokenizer,
    trainer_state: dict[str, Any],
    is_best: bool = False,
    keep_last: int = 0,
) -> Path:
    """Save ``step_<step>``, move the ``last`` (and ``best``) pointers, prune old checkpoints.

    Args:
        keep_last: keep this many newest step directories (0 keeps all); ``best`` always stays.
    """
    root = Path(out_dir) / "checkpoints"
    if root.is_dir():  # one writer per run: leftovers are from a killed save or prune
        for stale in [p for p in root.iterdir() if _LEFTOVER.match(p.name)]:
            shutil.rmtree(stale, ignore_errors=True)
        remove_stale_temporaries(root)  # a pointer file a killed run was writing
    directory = save_checkpoint(root / f"step_{step}", model, config, tokenizer, trainer_state)
    write_pointer(out_dir, "last", directory)
    if is_best:
        write_pointer(out_dir, "best", directory)
    if keep_last > 0:
        best = read_pointer(out_dir, "best")
        for old in step_dirs(out_dir)[:-keep_last]:
            if best is None or old.resolve() != best.resolve():
                doomed = Path(tempfile.mkdtemp(prefix=f"{old.name}.del-", dir=root))
                os.replace(old, doomed / old.name)  # atomic: step_<n> is whole or gone
                shutil.rmtree(doomed, ignore_errors=True)
    return directory


def find_resume_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest training checkpoint whose files all match their checksums, or None.

    Corrupt or incomplete checkpoints are skipped with a warning naming the path.
    """
    for directory in reversed(step_dirs(out_dir)):
        try:
            verify_checksums(directory)
            if not (directory / TRAINER_STATE).is_file():
                raise CheckpointError(f"{directory / TRAINER_STATE}: missing")
        except CheckpointError as error:
            warnings.warn(f"skipping checkpoint {directory}: {error}", stacklevel=2)
            continue
        return directory
    return None


# ----------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain containers."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
