"""Checkpoint averaging: the element-wise mean of several checkpoints' weights as a model directory.

Averaging the last few checkpoints of a run (Vaswani et al. 2017, section 6.1: the last 5 for the
base model) is a decoding-time step, not a training one: it reads verified checkpoints, refuses
inputs of different models or tokenizers, and writes a new directory whole or not at all through
:mod:`seq2seq.directory`.

    seq2seq average --out runs/m30k/avg --last 5 runs/m30k
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from seq2seq.checkpoint import (
    CONFIG,
    TOKENIZER,
    TRAINER_STATE,
    WEIGHTS,
    load_config_file,
    step_dirs,
)
from seq2seq.directory import (
    CheckpointError,
    check_new_output,
    first_line,
    regular_files,
    verify_checksums,
    write_directory,
    writing_to,
)
from seq2seq.textio import sha256_file


def _run_identity(directory: Path) -> dict[str, Any]:
    """What checkpoints must share to be averaged: the model and data settings (dotted keys) and
    the tokenizer files' contents."""
    config = load_config_file(directory).to_dict()
    identity: dict[str, Any] = {
        f"{section}.{key}": value
        for section in ("model", "data")
        for key, value in config[section].items()
    }
    for name in regular_files(directory):
        if name.startswith(f"{TOKENIZER}/"):
            identity[name] = sha256_file(directory / name)
    return identity


def average_checkpoints(
    directories: Sequence[str | Path], out_dir: str | Path, replace: bool = False
) -> Path:
    """Element-wise mean of several checkpoints' weights, written as a new model directory.

    Accumulates in float32 and casts back to each tensor's stored dtype. Config and tokenizer come
    from the first directory (exactly the files its checksums verified); no trainer state is
    written. ``out_dir`` must not exist: it is written beside its final place and renamed there
    only when complete. With ``replace``, ``out_dir`` may be an earlier average (a verified
    model directory without trainer state, holding no input), swapped out only once the new one
    is complete.

    Raises:
        CheckpointError: no inputs, a corrupt input, inputs with different tensors, or an
            ``out_dir`` that exists (with ``replace``: that is not an earlier average) or lies
            inside an input.
    """
    directories = [Path(d) for d in directories]
    if not directories:
        raise CheckpointError("average: no checkpoint directories given")
    if replace and os.path.lexists(out_dir):
        _check_replaceable_average(Path(out_dir), directories)
        out = Path(out_dir)
    else:
        out = check_new_output(out_dir, directories, "--out")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    reference: dict[str, Any] | None = None
    for directory in directories:
        verify_checksums(directory)
        identity = _run_identity(directory)
        if reference is None:
            reference = identity
        elif identity != reference:
            differing = sorted(
                k for k in reference.keys() | identity.keys() if reference.get(k) != identity.get(k)
            )
            raise CheckpointError(
                f"{directory}: differs from {directories[0]} in {', '.join(differing[:5])}: "
                "average only checkpoints of one model and tokenizer"
            )
        try:
            weights = load_file(str(directory / WEIGHTS))
        except (OSError, SafetensorError) as error:
            raise CheckpointError(
                f"{directory / WEIGHTS}: cannot load weights: {first_line(error)}"
            ) from error
        if total and (
            set(weights) != set(total) or any(weights[k].shape != total[k].shape for k in total)
        ):
            raise CheckpointError(f"{directory / WEIGHTS}: tensors differ from {directories[0]}")
        for name, tensor in weights.items():
            dtypes.setdefault(name, tensor.dtype)
            if name in total:
                total[name] += tensor.float()
            else:
                total[name] = tensor.float().clone()
    first = directories[0]
    with safe_open(str(first / WEIGHTS), framework="pt") as handle:
        metadata = handle.metadata()
    averaged = {name: (t / len(directories)).to(dtypes[name]) for name, t in total.items()}
    copied = [
        name for name in regular_files(first) if name == CONFIG or name.startswith(f"{TOKENIZER}/")
    ]

    def write(tmp: Path) -> None:
        with writing_to(tmp / WEIGHTS):
            save_file(averaged, str(tmp / WEIGHTS), metadata=metadata)
        for name in copied:
            with writing_to(tmp / name):
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(first / name, tmp / name, follow_symlinks=False)

    return write_directory(out, write, replace=replace)


def _check_replaceable_average(out: Path, inputs: Sequence[Path]) -> None:
    """``out`` is what average writes (and nothing more), and holds none of ``inputs``."""
    why = None
    if out.name in ("", ".", ".."):
        why = "name the directory itself, not '.' or '..'"
    elif out.is_symlink() or not out.is_dir():
        why = "not a directory"
    elif (out / TRAINER_STATE).exists() or (out / "checkpoints").exists():
        why = "a training checkpoint or run directory, not an averaged model"
    elif any(out.resolve() in (p.resolve(), *p.resolve().parents) for p in inputs):
        why = "it holds an input"
    else:
        try:
            verify_checksums(out)
        except CheckpointError as error:
            why = f"not a verified model directory ({error})"
    if why:
        raise CheckpointError(f"--out {out}: --replace refused: {why}")


def main(argv: list[str] | None = None) -> int:
    """``seq2seq average --out DIR (CKPT_DIR ... | --last K RUN_DIR)``.

    With ``--last K`` and fewer than K checkpoints in RUN_DIR (a run cut short by its time
    budget), those that exist are averaged and a warning gives the count; none is an error.
    """
    parser = argparse.ArgumentParser(
        prog="seq2seq average", description="Average checkpoint weights into a model directory."
    )
    parser.add_argument(
        "--out",
        required=True,
        help="model directory to create; it must not exist (see --replace)",
    )
    parser.add_argument(
        "--replace",
        action="store_true",
        help="let --out be an earlier average (a verified model directory without trainer "
        "state); it is swapped out only once the new one is complete",
    )
    parser.add_argument(
        "--last",
        type=int,
        metavar="K",
        help="average RUN_DIR's K newest checkpoints (all of them when it has fewer)",
    )
    parser.add_argument("paths", nargs="+", help="checkpoint directories, or one RUN_DIR")
    args = parser.parse_args(argv)
    if args.last is not None:
        if args.last < 1:
            parser.error(f"--last must be at least 1, got {args.last}")
        if len(args.paths) != 1:
            parser.error("--last K takes exactly one RUN_DIR")
        run_dir = Path(args.paths[0])
        directories = step_dirs(run_dir)[-args.last :]
        if not directories:
            parser.error(
                f"{run_dir}: no checkpoints (no step_<n> directory in {run_dir / 'checkpoints'})"
            )
        if len(directories) < args.last:
            print(
                f"seq2seq average: warning: {run_dir}: found {len(directories)} checkpoint(s), "
                f"fewer than --last {args.last}; averaging the {len(directories)} found",
                file=sys.stderr,
            )
    else:
        directories = [Path(p) for p in args.paths]
    try:
        out = average_checkpoints(directories, args.out, replace=args.replace)
    except CheckpointError as error:
        print(f"seq2seq average: error: {error}", file=sys.stderr)
        return 2
    print(f"averaged {len(directories)} checkpoints -> {out}")
    for directory in directories:
        print(f"  {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
