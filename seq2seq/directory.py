"""Directories written whole or not at all, and read only when verified whole.

A directory (a checkpoint, an averaged model, an export) is written under ``<name>.tmp-XXXX``
next to its final place, given ``checksums.json`` (the sha256 of every other file), fsynced and
renamed, so a crash mid-write never leaves a half-written ``<name>``. Its files get the mode the
umask gives (some writers create theirs 0600). Verification recomputes every digest and requires
the listing to be complete: an unlisted file, a symlink or a special file anywhere inside is an
error naming it, so nothing outside the directory is ever read through it. A failed write is a
:class:`CheckpointWriteError` naming the file, and ENOSPC for a full disk.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from safetensors import SafetensorError

from seq2seq.textio import fsync_path, sha256_file

CHECKSUMS = "checksums.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Below this many free bytes, a writer's failure is taken to be a full disk: torch.save reports
# ENOSPC only as "PytorchStreamWriter failed writing file" or "basic_ios::clear ... unexpected pos".
_FULL_DISK_BYTES = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt or incompatible; the message names the path."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (a full disk, permissions); the message names the path and,
    for a full disk, ENOSPC. An OSError too, as the failure it reports."""


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def writing_to(path: Path) -> Iterator[None]:
    """A writer's failure as a CheckpointWriteError naming ``path`` (and ENOSPC on a full disk)."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, RuntimeError, SafetensorError) as error:
        raise CheckpointWriteError(_write_failure(path, error)) from error


def _write_failure(path: Path, error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        name = errno.errorcode.get(error.errno, str(error.errno))
        return f"{path}: cannot write: {error.strerror or os.strerror(error.errno)} ({name})"
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    text = str(error)
    if (
        "No space left" in text
        or "StorageFull" in text
        or (free is not None and free < _FULL_DISK_BYTES)
    ):
        return f"{path}: cannot write: no space left on device (ENOSPC; {free} bytes free)"
    return f"{path}: cannot write: {first_line(error)}"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line
    errors that quote a library's multi-line message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def write_directory(directory: Path, write: Callable[[Path], None], replace: bool = True) -> Path:
    """Run ``write(tmp)`` on a fresh ``<name>.tmp-XXXX`` beside ``directory``, add
    ``checksums.json``, fsync, and rename it into place; on any failure the temp dir is removed.

    Files get the umask's mode (some writers create them 0600). With ``replace=False`` an
    existing ``directory`` is never touched: the call fails before writing (and again before the
    rename, should something appear there meanwhile).
    """
    if not replace and os.path.lexists(directory):
        raise CheckpointError(f"{directory}: already exists; refusing to replace it")
    with writing_to(directory.parent):
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{directory.name}.tmp-", dir=directory.parent))
    try:
        mask = _umask()
        tmp.chmod(0o777 & ~mask)  # mkdtemp makes it private; the result should follow the umask
        write(tmp)
        for name in regular_files(tmp):  # some writers (safetensors) create files 0600
            (tmp / name).chmod(0o666 & ~mask)
        add_checksums(tmp)
        if not replace and os.path.lexists(directory):
            raise CheckpointError(f"{directory}: appeared while writing; refusing to replace it")
        old = None
        if directory.exists():  # a directory cannot be renamed over a non-empty one
            old = Path(tempfile.mkdtemp(prefix=f"{directory.name}.old-", dir=directory.parent))
            os.replace(directory, old / directory.name)
        os.replace(tmp, directory)
        fsync_path(directory.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def add_checksums(folder: Path) -> None:
    """Write ``folder/checksums.json`` (the sha256 of every other file) and fsync every file and
    ``folder`` itself: the last step before a written directory is renamed into place.

    Raises:
        CheckpointWriteError: the checksum file cannot be written (named, ENOSPC when full).
        CheckpointError: a symlink or special file inside ``folder``.
    """
    names = regular_files(folder)
    with writing_to(folder / CHECKSUMS):
        checksums = {name: sha256_file(folder / name) for name in names}
        (folder / CHECKSUMS).write_text(json.dumps(checksums, indent=1, sort_keys=True) + "\n")
        for name in [*checksums, CHECKSUMS]:
            fsync_path(folder / name)
        fsync_path(folder)


def regular_files(root: Path) -> list[str]:
    """Relative POSIX paths of every regular file under ``root``, checksum file excluded.

    Raises:
        CheckpointError: a symlink or special file inside ``root`` (named): a model directory
            holds only its own regular files and folders, never a link to elsewhere.
    """
    names = []
    for folder, subdirs, files in os.walk(root):  # never descends into a symlinked folder
        for name in sorted(subdirs + files):
            path = Path(folder) / name
            if path.is_symlink():
                raise CheckpointError(
                    f"{path}: symlink inside a model directory (refused; copy the file in instead)"
                )
        for name in files:
            path = Path(folder) / name
            if not path.is_file():
                raise CheckpointError(f"{path}: not a regular file (refused in a model directory)")
            names.append(path.relative_to(root).as_posix())
    return sorted(name for name in names if name != CHECKSUMS)


# ----------------------------------------------------------------------------- reading


def verify_checksums(directory: str | Path) -> None:
    """Recompute every file's sha256 against ``checksums.json``, which must list every file.

    Raises:
        CheckpointError: the checksum file is missing or not a non-empty ``{name: sha256}``
            object; a listed file is missing; a file is not listed; a symlink or special file
            is inside the directory; or a digest differs. The message names the path.
    """
    directory = Path(directory)
    listing = directory / CHECKSUMS
    if listing.is_symlink():
        raise CheckpointError(f"{listing}: symlink inside a model directory (refused)")
    try:
        expected = json.loads(listing.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{listing}: cannot read checksums: {error}") from error
    if not isinstance(expected, dict) or not expected:
        raise CheckpointError(
            f"{listing}: malformed: expected a non-empty object {{file name: sha256}}, got "
            f"{json.dumps(expected)[:40]}"
        )
    for name, digest in expected.items():
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise CheckpointError(f"{listing}: malformed sha256 for {name!r}: {digest!r}")
    present = regular_files(directory)
    unlisted = sorted(set(present) - set(expected))
    if unlisted:
        raise CheckpointError(
            f"{directory / unlisted[0]}: file not listed in {CHECKSUMS} (unverified file refused)"
        )
    for name, digest in expected.items():
        path = directory / name
        if name not in present:
            raise CheckpointError(f"{path}: file listed in {CHECKSUMS} is missing")
        if sha256_file(path) != digest:
            raise CheckpointError(f"{path}: sha256 does not match {CHECKSUMS} (corrupt file)")


def check_new_output(out: str | Path, inputs: Sequence[str | Path], what: str) -> Path:
    """Refuse an output directory that exists or lies inside one of ``inputs``.

    Args:
        out: the directory a command is about to create.
        inputs: the directories it reads from.
        what: the option naming ``out`` in messages, e.g. ``--out``.

    Returns:
        ``out`` as a Path.

    Raises:
        CheckpointError: ``out`` exists (any path: a file, a run directory, ``.``, an input)
            or would be created inside an input (whose checksums would no longer list it).
    """
    out = Path(out)
    if os.path.lexists(out):
        raise CheckpointError(
            f"{what} {out}: already exists; choose a new directory (nothing was written)"
        )
    target = out.resolve()
    for directory in inputs:
        source = Path(directory).resolve()
        if target == source or source in target.parents:
            raise CheckpointError(
                f"{what} {out}: inside the input {directory}; choose a directory outside it"
            )
    return out
