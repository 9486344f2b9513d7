"""Corpora in, token-budget batches out.

Flow: ``read_parallel`` / ``read_lm_text`` (text, gz, tsv, jsonl, ``datasets``) -> ``prepare``
(train the tokenizer, encode in worker processes, filter, binarize once) -> ``TokenizedCorpus`` /
``LMCorpus`` (memory-mapped ids) -> ``batch_indices`` (token budget) -> ``collate`` -> ``Batch``.

Shapes: b batch, s source length (pieces + EOS), t target length (BOS + pieces, or pieces + EOS;
for a language model the block size).

A prepared directory holds::

    manifest.json           settings it was built from, counts, length statistics, id dtype
    tokenizer/              Tokenizer.save
    {split}.src.bin / .idx  flat piece ids (uint16 when the vocabulary has < 65536 ids, else int32)
    {split}.tgt.bin / .idx  and int64 offsets, n_examples + 1 of them
    {split}.lm.bin          language modelling: the split's whole id stream

Every split is filtered the same way: an example with an empty side is dropped, and one whose
source (with EOS) or target (with BOS) is longer than ``max_source_len``/``max_target_len`` is
dropped, or cut to fit with ``data.truncate``; both are counted and reported.
The ``hf`` format takes a ``datasets`` name or a local folder of data files named by split (e.g.
``train.jsonl``, ``validation.jsonl``: ``datasets`` calls that split ``validation``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import itertools
import json
import os
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from seq2seq.config import ConfigError, DataConfig, RunConfig, load_config
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, TokenizerError, train_tokenizer

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
_PREPARE_VERSION = 1
_NOT_SETTINGS = {"prepared_dir", "valid_split", "test_split", "num_workers", "max_tokens"}
_NOT_SETTINGS |= {"block_size", "batch_size"}
_CHUNK_EXAMPLES = 2000  # examples per worker task
_CHUNK_CHARS = 1 << 20  # language-model text per worker task


class DataError(ValueError):
    """Unreadable or malformed data; the message names the file, line (1-based) and problem."""


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
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: cannot read: {error}") from error
    if not raw:
        raise DataError(f"{path}: file is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 ({error.reason})") from None


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
            f"datasets: {type(error).__name__}: {error}. The hub may be unreachable (offline?): "
            "point data.path at a local folder, or set HF_HUB_OFFLINE=1 to use the local cache"
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
    """Lines of a plain or gzip UTF-8 file without their line breaks (split on ``\\n`` only)."""
    n = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as file:
            for n, raw in enumerate(file, 1):  # noqa: B007
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(
                        f"{path}:{n}: invalid UTF-8 ({error.reason} at byte {error.start})"
                    ) from None
                yield text.rstrip("\r\n")
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}:{n + 1}: cannot read: {error}") from error
    if n == 0:
        raise DataError(f"{path}: file is empty")


def prepare(config: RunConfig, splits: Sequence[str] | None = None, force: bool = False) -> Path:
    """Tokenize and binarize the corpus once into ``config.prepared_dir()``; return that directory.

    Nothing is done when the directory's manifest records the same data settings and the splits
    asked for (default: the train and valid splits). Changed settings redo everything; a split
    not yet there is encoded with the existing tokenizer. Call it on one process only.

    Raises:
        DataError: unreadable input, or a split left with no examples after filtering.
        TokenizerError: the tokenizer cannot be trained with these settings.
    """
    data = config.data
    out = config.prepared_dir()
    settings = _settings(data)
    manifest = None if force else _read_manifest(out)
    if manifest is not None and manifest.get("settings") != settings:
        old = manifest.get("settings", {})
        changed = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
        print(f"prepare: data settings changed ({', '.join(changed)}); preparing {out} again")
        manifest = None
    if data.format == "lm" or not splits:
        splits = (data.train_split, data.valid_split)
    splits = list(dict.fromkeys(splits))
    missing = splits
    if manifest is not None:
        missing = [s for s in splits if not _split_ready(out, manifest, s)]
        if not missing:
            print(f"prepare: {out} already holds {', '.join(splits)}; nothing to do")
            return out
        if data.format == "lm":  # both splits come from one stream
            manifest = None
    if manifest is None:
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)  # a crash below must not leave a stale manifest
        if data.format == "lm":
            _prepare_lm(data, out, settings)
            return out
        print(
            f"prepare: training the {data.tokenizer} tokenizer on {data.path} [{data.train_split}]"
        )
        sources = (s for s, _ in read_parallel(data, data.train_split))
        targets = (t for _, t in read_parallel(data, data.train_split))
        manifest = _new_manifest(
            settings, train_tokenizer(data, sources, targets, out / TOKENIZER_DIR)
        )
    for split in missing:
        manifest["splits"][split] = _binarize(data, split, out, np.dtype(manifest["dtype"]))
        _write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return out


def _settings(data: DataConfig) -> dict[str, Any]:
    """The data settings a prepared directory depends on (not batching, workers or split names)."""
    settings = {k: v for k, v in dataclasses.asdict(data).items() if k not in _NOT_SETTINGS}
    local = Path(data.path).expanduser()
    settings["path"] = str(local.resolve()) if local.exists() else data.path
    return {"version": _PREPARE_VERSION, **settings}


def _new_manifest(settings: dict[str, Any], tokenizer: Tokenizer) -> dict[str, Any]:
    sizes = {"src_vocab_size": tokenizer.src_vocab_size, "tgt_vocab_size": tokenizer.tgt_vocab_size}
    joint = "joint" if tokenizer.is_joint else "separate"
    print(f"prepare: {tokenizer.kind} tokenizer, {joint} vocabularies, {sizes}")
    return {
        "settings": settings,
        "dtype": "uint16" if max(sizes.values()) < 65536 else "int32",
        "tokenizer": {"kind": tokenizer.kind, "joint": tokenizer.is_joint, **sizes},
        "splits": {},
    }


def _split_ready(out: Path, manifest: dict[str, Any], split: str) -> bool:
    files = [f"{split}.{side}.{ext}" for side in ("src", "tgt") for ext in ("bin", "idx")]
    if manifest["settings"]["format"] == "lm":
        files = [f"{split}.lm.bin"]
    return split in manifest["splits"] and all((out / name).is_file() for name in files)


def _binarize(data: DataConfig, split: str, out: Path, dtype: np.dtype) -> dict[str, Any]:
    chunks = _chunks(read_parallel(data, split), _CHUNK_EXAMPLES)
    parts: dict[str, tuple[list, list]] = {"src": ([], []), "tgt": ([], [])}  # ids, lengths
    n_empty = n_long = seen = 0
    limits = (data.max_source_len - 1, data.max_target_len - 1)  # room for EOS / BOS
    with tqdm(desc=f"encode {split}", unit=" ex", file=sys.stderr, disable=None) as progress:
        for encoded in _encode(chunks, out / TOKENIZER_DIR, data):
            (_, src_len), (_, tgt_len) = encoded
            empty = (src_len == 0) | (tgt_len == 0)
            too_long = ((src_len > limits[0]) | (tgt_len > limits[1])) & ~empty
            keep = ~(empty | (too_long & (not data.truncate)))
            for side, (ids, lengths), limit in zip(parts, encoded, limits):
                within = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
                mask = np.repeat(keep, lengths) & (within < limit)
                parts[side][0].append(ids[mask].astype(dtype))
                parts[side][1].append(np.minimum(lengths, limit)[keep])
            n_empty, n_long, seen = n_empty + empty.sum(), n_long + too_long.sum(), seen + len(keep)
            progress.update(len(keep))
    kept = int(seen - n_empty - (0 if data.truncate else n_long))
    if kept == 0:
        raise DataError(f"{data.path}: split {split!r}: no examples left of {seen} after filtering")
    stats = {"examples": kept, "dropped_empty": int(n_empty)}
    stats["truncated" if data.truncate else "dropped_too_long"] = int(n_long)
    print(
        f"prepare: {split}: kept {kept} of {seen} examples; dropped {n_empty} with an empty side "
        f"and {'truncated ' * data.truncate}{n_long} longer than {data.max_source_len} source / "
        f"{data.max_target_len} target tokens (EOS or BOS included)"
    )
    for side, (ids, lengths) in parts.items():
        lengths = np.concatenate(lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        _write_bytes(out / f"{split}.{side}.bin", np.concatenate(ids).tobytes())
        _write_bytes(out / f"{split}.{side}.idx", offsets.tobytes())
        stats[f"{side}_tokens"] = _length_stats(lengths + 1)
        print(f"prepare: {split}: {side} lengths with EOS/BOS: {stats[f'{side}_tokens']}")
    return stats


def _prepare_lm(data: DataConfig, out: Path, settings: dict[str, Any]) -> None:
    text = read_lm_text(data)
    print(f"prepare: training the {data.tokenizer} tokenizer on {data.path} ({len(text)} chars)")
    lines = _cut_after_newlines(text, 0)
    manifest = _new_manifest(settings, train_tokenizer(data, lines, None, out / TOKENIZER_DIR))
    pieces = _cut_after_newlines(text, _CHUNK_CHARS)
    chunks = _chunks(((piece, "") for piece in pieces), 1)
    encoded = _encode(chunks, out / TOKENIZER_DIR, data)
    progress = tqdm(encoded, desc="encode", unit=" chunk", file=sys.stderr, disable=None)
    ids = np.concatenate([ids for (ids, _), _ in progress]).astype(manifest["dtype"])
    n_valid = int(len(ids) * data.valid_fraction)
    if n_valid == 0 or n_valid == len(ids):
        raise DataError(f"{data.path}: {len(ids)} tokens cannot be split by valid_fraction")
    for split, part in ((data.train_split, ids[:-n_valid]), (data.valid_split, ids[-n_valid:])):
        _write_bytes(out / f"{split}.lm.bin", part.tobytes())
        manifest["splits"][split] = {"tokens": len(part)}
        print(f"prepare: {split}: {len(part)} tokens")
    _write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())


def _cut_after_newlines(text: str, size: int) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _length_stats(lengths: np.ndarray) -> dict[str, Any]:
    p50, p95 = np.percentile(lengths, [50, 95]).astype(int).tolist()
    total, mean, top = int(lengths.sum()), round(float(lengths.mean()), 2), int(lengths.max())
    return {"total": total, "mean": mean, "p50": p50, "p95": p95, "max": top}


Encoded = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # (ids, lengths) x2
_worker_tokenizer: Tokenizer | None = None  # set in each worker process by _init_worker


def _encode(
    chunks: Iterable[list[tuple[str, str]]], tokenizer_dir: Path, data: DataConfig
) -> Iterator[Encoded]:
    """Encode chunks in order, in ``data.num_workers`` processes, keeping few chunks in flight."""
    if data.num_workers <= 1:
        tokenizer = Tokenizer.load(tokenizer_dir)
        for chunk in chunks:
            yield _encode_pairs(chunk, tokenizer)
        return
    with Pool(data.num_workers, initializer=_init_worker, initargs=(str(tokenizer_dir),)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_pairs, (chunk,)))
            if len(pending) >= 2 * data.num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_dir)


def _encode_pairs(chunk: list[tuple[str, str]], tokenizer: Tokenizer | None = None) -> Encoded:
    """Flat int32 ids and per-example piece counts for each side."""
    tokenizer = tokenizer or _worker_tokenizer  # the worker's, loaded by _init_worker
    sides = (
        tokenizer.encode_source_batch([s for s, _ in chunk]),
        tokenizer.encode_target_batch([t for _, t in chunk]),
    )
    out = []
    for seqs in sides:
        lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
        flat = np.fromiter(itertools.chain.from_iterable(seqs), np.int32, int(lengths.sum()))
        out.append((flat, lengths))
    return tuple(out)  # type: ignore[return-value]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


class TokenizedCorpus:
    """One prepared split of a parallel corpus, memory-mapped.

    Attributes:
        src_lengths: (n,) int64, source pieces + 1 (EOS).
        tgt_lengths: (n,) int64, target pieces + 1 (BOS, or EOS in the output).
    """

    def __init__(self, directory: str | Path, split: str) -> None:
        self.directory, self.split = Path(directory), split
        dtype = _prepared_dtype(self.directory, split)
        self._src, self._src_offsets = _open_ids(self.directory / f"{split}.src", dtype)
        self._tgt, self._tgt_offsets = _open_ids(self.directory / f"{split}.tgt", dtype)
        if len(self._src_offsets) != len(self._tgt_offsets):
            raise DataError(f"{self.directory}: {split}.src.idx and {split}.tgt.idx disagree")
        self.src_lengths = np.diff(self._src_offsets) + 1
        self.tgt_lengths = np.diff(self._tgt_offsets) + 1

    def __len__(self) -> int:
        return len(self.src_lengths)

    def source(self, i: int) -> np.ndarray:
        return self._src[self._src_offsets[i] : self._src_offsets[i + 1]]

    def target(self, i: int) -> np.ndarray:
        return self._tgt[self._tgt_offsets[i] : self._tgt_offsets[i + 1]]

    def __getstate__(self) -> dict[str, Any]:  # reopen the maps instead of pickling their data
        return {"directory": self.directory, "split": self.split}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["split"])


def _prepared_dtype(directory: Path, split: str) -> np.dtype:
    manifest = _read_manifest(directory)
    if manifest is None or not _split_ready(directory, manifest, split):
        raise DataError(f"{directory / MANIFEST}: split {split!r} is not prepared; run prepare")
    return np.dtype(manifest["dtype"])


def _open_ids(stem: Path, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    bin_path, idx_path = Path(f"{stem}.bin"), Path(f"{stem}.idx")
    try:
        offsets = np.fromfile(idx_path, dtype=np.int64)
        size = bin_path.stat().st_size
    except OSError as error:
        raise DataError(f"{error.filename}: cannot open prepared data: {error.strerror}") from error
    if len(offsets) == 0 or offsets[-1] * dtype.itemsize != size:
        raise DataError(f"{bin_path}: size does not match {idx_path}; prepare again")
    ids = np.memmap(bin_path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
    return ids, offsets


def batch_indices(
    corpus: TokenizedCorpus, max_tokens: int, seed: int, epoch: int
) -> list[np.ndarray]:
    """Split the corpus into batches of example indices under a token budget.

    Examples are sorted by (source length, target length) with a random tie-break drawn from
    (seed, epoch), packed greedily so that ``len(batch) * longest <= max_tokens`` where ``longest``
    is the longest source or target in the batch (padding counted), and the batch order is
    shuffled. A pure function of its arguments.

    Raises:
        DataError: one example alone is longer than ``max_tokens``.
    """
    widths = np.maximum(corpus.src_lengths, corpus.tgt_lengths)
    rng = np.random.default_rng([seed, epoch])
    order = np.lexsort((rng.random(len(widths)), corpus.tgt_lengths, corpus.src_lengths))
    batches, start, longest = [], 0, 0
    for pos, width in enumerate(widths[order].tolist()):
        if width > max_tokens:
            raise DataError(
                f"example {order[pos]} has {width} tokens, more than max_tokens={max_tokens}: "
                "raise data.max_tokens, or lower data.max_source_len/max_target_len and prepare"
            )
        longest = max(longest, width)
        if (pos - start + 1) * longest > max_tokens:
            batches.append(order[start:pos])
            start, longest = pos, width
    if start < len(order):
        batches.append(order[start:])
    return [batches[k] for k in rng.permutation(len(batches))]


@dataclass
class Batch:
    """Tensors for one step; right-padded with ``PAD_ID``.

    Attributes:
        src: (b, s) source ids, pieces + EOS; None for a decoder-only model.
        tgt_in: (b, t) decoder input, BOS + pieces (a language model: the block).
        tgt_out: (b, t) what to predict, pieces + EOS (a language model: the block shifted by one).
        n_src_tokens: non-pad tokens in ``src``.
        n_tgt_tokens: non-pad tokens in ``tgt_out`` (the loss normalizer).
    """

    src: Tensor | None
    tgt_in: Tensor
    tgt_out: Tensor
    n_src_tokens: int
    n_tgt_tokens: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        src = None if self.src is None else self.src.to(device, non_blocking=non_blocking)
        tgt_in = self.tgt_in.to(device, non_blocking=non_blocking)
        tgt_out = self.tgt_out.to(device, non_blocking=non_blocking)
        return Batch(src, tgt_in, tgt_out, self.n_src_tokens, self.n_tgt_tokens)


def collate(corpus: TokenizedCorpus, indices: Sequence[int] | np.ndarray) -> Batch:
    """Pad the examples ``indices`` of ``corpus`` into a :class:`Batch`."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        raise ValueError("collate needs at least one example")
    src_lengths, tgt_lengths = corpus.src_lengths[indices], corpus.tgt_lengths[indices]
    src = np.full((len(indices), src_lengths.max()), PAD_ID, dtype=np.int64)
    tgt_in = np.full((len(indices), tgt_lengths.max()), PAD_ID, dtype=np.int64)
    tgt_out = tgt_in.copy()
    for row, i in enumerate(indices.tolist()):
        s, t = corpus.source(i), corpus.target(i)
        src[row, : len(s)], src[row, len(s)] = s, EOS_ID
        tgt_in[row, 0], tgt_in[row, 1 : len(t) + 1] = BOS_ID, t
        tgt_out[row, : len(t)], tgt_out[row, len(t)] = t, EOS_ID
    src_t, tgt_in_t, tgt_out_t = (torch.from_numpy(a) for a in (src, tgt_in, tgt_out))
    return Batch(src_t, tgt_in_t, tgt_out_t, int(src_lengths.sum()), int(tgt_lengths.sum()))


class LMCorpus:
    """One prepared split of a language-modelling stream, memory-mapped: ``ids`` is (n,)."""

    def __init__(self, directory: str | Path, split: str) -> None:
        self.directory, self.split = Path(directory), split
        dtype = _prepared_dtype(self.directory, split)
        self.ids = np.memmap(self.directory / f"{split}.lm.bin", dtype=dtype, mode="r")

    def __len__(self) -> int:
        return len(self.ids)


def lm_batch(
    corpus: LMCorpus, block_size: int, batch_size: int, generator: torch.Generator
) -> Batch:
    """``batch_size`` random blocks: tgt_in = ids[i : i+block], tgt_out = ids[i+1 : i+block+1]."""
    if len(corpus) < block_size + 1:
        where = corpus.directory / f"{corpus.split}.lm.bin"
        raise DataError(f"{where}: {len(corpus)} tokens, fewer than block_size + 1")
    starts = torch.randint(len(corpus) - block_size, (batch_size,), generator=generator).tolist()
    rows = np.stack([corpus.ids[i : i + block_size + 1] for i in starts]).astype(np.int64)
    block = torch.from_numpy(rows)
    x, y = block[:, :-1].contiguous(), block[:, 1:].contiguous()
    return Batch(None, x, y, 0, batch_size * block_size)


def lm_eval_batches(
    corpus: LMCorpus, block_size: int, batch_size: int, n_batches: int, seed: int
) -> list[Batch]:
    """The same ``n_batches`` random batches every call with the same ``seed`` (for validation)."""
    generator = torch.Generator().manual_seed(seed)
    return [lm_batch(corpus, block_size, batch_size, generator) for _ in range(n_batches)]


def main(argv: list[str] | None = None) -> int:
    """``seq2seq prepare CONFIG.yaml [section.key=value ...]``: tokenize and binarize once."""
    about = "Train the tokenizer and binarize the corpus into the run's prepared_dir, once."
    parser = argparse.ArgumentParser(prog="seq2seq prepare", description=about)
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--splits", default="", help="comma-separated (default: train,valid)")
    parser.add_argument("--force", action="store_true", help="prepare again even if up to date")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        print("prepare: data settings:", json.dumps(config.data.__dict__, sort_keys=True))
        splits = [s for s in args.splits.split(",") if s] or None
        out = prepare(config, splits, force=args.force)
    except (DataError, ConfigError, TokenizerError) as error:
        print(f"seq2seq prepare: error: {error}", file=sys.stderr)
        return 2
    print(f"prepare: done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
