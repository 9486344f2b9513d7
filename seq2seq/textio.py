"""Text files in and out: UTF-8 lines with file:line errors, and atomic writes.

Every command reads text the same way: split on ``\\n`` only (``\\r\\n`` and a leading BOM are
dropped), strict UTF-8 with the file and the 1-based line named on failure, ``.gz`` read
transparently. Every file we write appears whole or not at all: it is written beside its final
name as ``<name>.tmp-<pid>``, fsynced, renamed over the target, and removed if anything fails.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# Everything str.splitlines() breaks on: translating these to spaces keeps an example on one line.
LINE_BREAKS = str.maketrans(dict.fromkeys("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029", " "))
TMP_MARK = ".tmp-"  # temporary files are "<name>.tmp-<pid>"


def iter_lines(
    source: str | Path | BinaryIO,
    name: str | None = None,
    *,
    error: type[Exception] = ValueError,
    replace_invalid: bool = False,
    hint: str = "",
) -> Iterator[str]:
    """Decode a UTF-8 file (plain or ``.gz``) or byte stream line by line, without line breaks.

    Args:
        source: a path, or an open binary stream (e.g. ``sys.stdin.buffer``).
        name: what messages call the source (default: the path).
        error: the exception class raised, so that each command keeps its own error type.
        replace_invalid: decode bad bytes as U+FFFD instead of raising.
        hint: appended to the invalid-UTF-8 message (what the user can do about it).

    Raises:
        error: invalid UTF-8 (naming ``name:line``) or an unreadable file.
    """
    name = str(source if name is None else name)
    number = 0
    try:
        if isinstance(source, (str, Path)):
            path = Path(source)
            stream = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
        else:
            stream = source
        with stream if isinstance(source, (str, Path)) else contextlib.nullcontext(stream) as lines:
            for number, raw in enumerate(lines, start=1):  # noqa: B007
                raw = raw[:-1] if raw.endswith(b"\n") else raw
                raw = raw[:-1] if raw.endswith(b"\r") else raw
                try:
                    line = raw.decode("utf-8", errors="replace" if replace_invalid else "strict")
                except UnicodeDecodeError as bad:
                    raise error(
                        f"{name}:{number}: invalid UTF-8 at byte {bad.start} of the line "
                        f"({bad.reason}){hint}"
                    ) from None
                yield line.removeprefix("\ufeff") if number == 1 else line
    except (OSError, EOFError, zlib.error) as failure:
        where = f"{name}:{number + 1}" if number else name
        reason = getattr(failure, "strerror", None) or failure
        raise error(f"{where}: cannot read: {reason}") from failure


def read_text(path: str | Path, *, error: type[Exception] = ValueError) -> str:
    """The whole UTF-8 text of a plain or ``.gz`` file, naming the line of any invalid byte.

    Raises:
        error: unreadable file or invalid UTF-8.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as failure:
        reason = getattr(failure, "strerror", None) or failure
        raise error(f"{path}: cannot read: {reason}") from failure
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        line = raw.count(b"\n", 0, bad.start) + 1
        raise error(f"{path}:{line}: invalid UTF-8 ({bad.reason})") from None


def atomic_write_bytes(path: str | Path, payload: bytes | memoryview) -> None:
    """Write ``payload`` to ``path`` so that ``path`` is the old file or the new one, never half.

    Raises:
        OSError: the write failed (e.g. ENOSPC); ``path`` is untouched and no temporary is left.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with tmp.open("wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.filename is None:  # a failed write() names no file: name the one we meant
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries (making a rename inside it durable), to
    disk; a no-op where the platform cannot open ``path`` for that (some cannot open folders)."""
    directory = os.path.isdir(path) and hasattr(os, "O_DIRECTORY")
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete ``*.tmp-<pid>`` files in ``folder`` whose writing process no longer runs."""
    removed = []
    for tmp in Path(folder).glob(f"*{TMP_MARK}*"):
        pid = tmp.name.rpartition(TMP_MARK)[2]
        if tmp.is_file() and pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
