"""Corpus readers: the (source, target) pairs of one split, or a language model's text, as
``data.format`` says to read them (text, gz, tsv, jsonl, ``datasets``).

Training and the recipe tools read a corpus through these functions, so every tool sees the same
examples. Errors name the file and line (or the dataset row) at fault. The ``hf`` format takes a
``datasets`` name or a local folder of files named by split (``validation.jsonl``, ...).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from seq2seq.config import DataConfig
from seq2seq.data import DataError
from seq2seq.textio import iter_lines, read_text


def read_parallel(data: DataConfig, split: str) -> Iterator[tuple[str, str]]:
    """Stream the (source, target) pairs of one split as ``data.format`` says to read them.

    Raises:
        DataError: a file is missing, empty, not UTF-8, malformed, or the sides disagree in length.
    """
    readers = {"text": _iter_text, "tsv": _iter_tsv, "jsonl": _iter_jsonl, "hf": _iter_hf}
    if data.format not in readers:
        raise DataError(f"data.format={data.format!r} has no parallel splits")
    return readers[data.format](data, split)


def read_lm_text(data: DataConfig) -> str:
    """The whole text of the one file a language model trains on (``data.path``, plain or .gz)."""
    path = Path(data.path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (data.format=lm reads one text file)")
    text = read_text(path, error=DataError)
    if not text:
        raise DataError(f"{path}: file is empty")
    return text


def _iter_text(data: DataConfig, split: str) -> Iterator[tuple[str, str]]:
    folder = Path(data.path)
    src_path = _find(folder, f"{split}.{data.src_lang}")
    tgt_path = _find(folder, f"{split}.{data.tgt_lang}")
    src_lines, tgt_lines = _lines(src_path), _lines(tgt_path)
    for n, (src, tgt) in enumerate(itertools.zip_longest(src_lines, tgt_lines), 1):
        if src is None or tgt is None:
            rest = tgt_lines if src is None else src_lines
            longer = n + sum(1 for _ in rest)
            counts = (n - 1, longer) if src is None else (longer, n - 1)
            raise DataError(
                f"{src_path} has {counts[0]} lines but {tgt_path} has {counts[1]}: "
                "parallel files must have one line per example"
            )
        yield src, tgt


def _iter_tsv(data: DataConfig, split: str) -> Iterator[tuple[str, str]]:
    path = _find(Path(data.path), f"{split}.tsv")
    for n, line in enumerate(_lines(path), 1):
        columns = line.split("\t")
        if len(columns) != 2:
            raise DataError(
                f"{path}:{n}: expected 2 tab-separated columns (source, target), "
                f"found {len(columns)}"
            )
        yield columns[0], columns[1]


def _iter_jsonl(data: DataConfig, split: str) -> Iterator[tuple[str, str]]:
    path = _find(Path(data.path), f"{split}.jsonl")
    for n, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{n}: invalid JSON: {error.msg} (col {error.colno})") from None
        where = f"{path}:{n}"
        yield _field(record, data.src_field, where), _field(record, data.tgt_field, where)


def _offline_hint() -> str:
    """What to try after a failed hub load; never advice to set a variable that is set."""
    offline = [
        name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
    ]  # fmt: skip
    if offline:
        return (
            f"{' and '.join(offline)} {'is' if len(offline) == 1 else 'are'} set, so only the "
            "local cache is read and it lacks this "
            "dataset: point data.path at a local folder, or load it once with network access"
        )
    return (
        "The hub may be unreachable (offline?): point data.path at a local folder, or set "
        "HF_HUB_OFFLINE=1 to use the local cache"
    )


def _iter_hf(data: DataConfig, split: str) -> Iterator[tuple[str, str]]:
    import datasets  # slow to import; only this format needs it

    name = data.path
    if name.startswith(("/", ".", "~")) and not Path(name).expanduser().exists():
        raise DataError(f"{name}: no such local dataset folder")
    try:
        dataset = datasets.load_dataset(name, data.hf_config or None, split=split)
    except Exception as error:  # datasets raises many types (network, missing split, bad files)
        raise DataError(
            f"{name}: could not load split {split!r} (config {data.hf_config or None!r}) with "
            f"datasets: {type(error).__name__}: {error}. {_offline_hint()}"
        ) from error
    columns = sorted({f.split(".")[0] for f in (data.src_field, data.tgt_field)})
    for column in set(columns) - set(dataset.column_names):
        raise DataError(
            f"{name} [{split}]: no column {column!r}; available columns: {dataset.column_names}"
        )
    row = 0
    for batch in dataset.select_columns(columns).iter(batch_size=1000):
        for values in zip(*(batch[c] for c in columns)):
            row += 1
            record, where = dict(zip(columns, values)), f"{name} [{split}] row {row}"
            yield _field(record, data.src_field, where), _field(record, data.tgt_field, where)


def _field(record: Any, dotted: str, where: str) -> str:
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            found = sorted(value) if isinstance(value, dict) else f"a {type(value).__name__}"
            raise DataError(
                f"{where}: no field {dotted!r} (missing {key!r}; available keys: {found})"
            )
        value = value[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {dotted!r} is a {type(value).__name__}, expected a string")
    return value


def _find(folder: Path, name: str) -> Path:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder / name}: file not found (nor {name}.gz)")


def _lines(path: Path) -> Iterator[str]:
    """Lines of a plain or gzip UTF-8 file (see ``seq2seq.textio.iter_lines``); never empty."""
    n = 0
    for n, line in enumerate(iter_lines(path, error=DataError), 1):  # noqa: B007
        yield line
    if n == 0:
        raise DataError(f"{path}: file is empty")
