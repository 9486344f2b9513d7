"""Corpora in, a prepared directory out: the offline half of the data flow, run once per corpus.

Flow: ``read_parallel`` / ``read_lm_text`` (``seq2seq.readers``) -> train the
tokenizer -> encode in worker processes -> filter -> binarize -> ``manifest.json`` (layout: see
``seq2seq.data``). The manifest records the whole ``data`` section: the data is prepared again
when any of it changes, never for another section (``prepare``, ``batch``, ...).

Every split is filtered the same way: an example with an empty side is dropped, and one whose
source (with EOS) or target (with BOS) is longer than ``max_source_len``/``max_target_len`` is
dropped, or cut to fit with ``data.truncate``; both are counted and reported.

With ``data.subword_alpha`` > 0 the training split is also written ``subword_samples`` more times
as ``{train_split}.sample{k}``, each with segmentations drawn by SentencePiece's sampling (seeded
per chunk: the same files with any number of forked workers; SentencePiece 0.2 draws others in a
new process, so preparing again from scratch does not repeat them); training reads one of them
per epoch.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from seq2seq.config import ConfigError, DataConfig, RunConfig, load_config
from seq2seq.data import MANIFEST, TOKENIZER_DIR, DataError, read_manifest, sha256, split_files
from seq2seq.readers import read_lm_text, read_parallel
from seq2seq.textio import atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from seq2seq.tokenizer import Tokenizer, TokenizerError, train_tokenizer

_PREPARE_VERSION = 2  # 2: per-file sizes and SHA-256 in the manifest
_CHUNK_EXAMPLES = 2000  # examples per worker task
_CHUNK_CHARS = 1 << 20  # language-model text per worker task


def prepare(config: RunConfig, splits: Sequence[str] | None = None, force: bool = False) -> Path:
    """Tokenize and binarize the corpus once into ``config.prepared_dir()``; return that directory.

    Nothing is done when the directory's manifest records the same ``data`` section and the
    splits asked for (default: the train and valid splits). A changed ``data`` section redoes
    everything; a split not yet there is encoded with the existing tokenizer. Call it on one
    process only. A failure leaves no temporary file, and no manifest entry for what it did not
    finish, so the next call starts that again.

    Raises:
        DataError: unreadable input, a split left with no examples after filtering, or a worker
            process that died (e.g. killed by the out-of-memory killer).
        TokenizerError: the tokenizer cannot be trained with these settings.
        OSError: the output cannot be written (e.g. a full disk); the message names the file.
    """
    data, workers = config.data, config.prepare.num_workers
    out = config.prepared_dir()
    settings = data_fingerprint(data)
    tokenizer: Tokenizer | None = None
    manifest = None if force else read_manifest(out)
    if manifest is not None and manifest.get("settings") != settings:
        old = manifest.get("settings", {})
        changed = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
        print(f"prepare: data settings changed ({', '.join(changed)}); preparing {out} again")
        manifest = None
    if data.format == "lm" or not splits:
        splits = (data.train_split, data.valid_split)
    if data.train_split in splits:
        splits = [*splits, *data.sampled_splits()]
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
        remove_stale_temporaries(out)  # left by a process that was killed while writing
        (out / MANIFEST).unlink(missing_ok=True)  # a crash below must not leave a stale manifest
        if data.format == "lm":
            _prepare_lm(data, out, settings, workers)
            return out
        print(
            f"prepare: training the {data.tokenizer} tokenizer on {data.path} [{data.train_split}]"
        )
        sources = (s for s, _ in read_parallel(data, data.train_split))
        targets = (t for _, t in read_parallel(data, data.train_split))
        tokenizer = train_tokenizer(
            data, sources, targets, out / TOKENIZER_DIR, num_threads=max(1, workers)
        )
        manifest = new_manifest(settings, tokenizer)
    elif workers <= 1:
        tokenizer = Tokenizer.load(out / TOKENIZER_DIR)
    for split in missing:
        dtype = np.dtype(manifest["dtype"])
        manifest["splits"][split] = _binarize(data, split, out, dtype, tokenizer, workers)
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return out


def data_fingerprint(data: DataConfig) -> dict[str, Any]:
    """The fingerprint of a prepared directory: the whole ``data`` section, path resolved.

    A prepared directory whose manifest records another fingerprint is prepared again.
    """
    settings = dataclasses.asdict(data)
    if data.subword_alpha == 0:  # as before the option existed: those directories stay valid
        del settings["subword_alpha"], settings["subword_samples"]
    local = Path(data.path).expanduser()
    settings["path"] = str(local.resolve()) if local.exists() else data.path
    return {"version": _PREPARE_VERSION, **settings}


def new_manifest(settings: dict[str, Any], tokenizer: Tokenizer) -> dict[str, Any]:
    """A manifest with no split yet, for ``tokenizer`` and the fingerprint ``settings``.

    The id dtype is the narrowest that holds both vocabularies (uint16, else int32).
    """
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
    """The split is recorded and its files have the recorded sizes (checksums: at load time)."""
    recorded = manifest["splits"].get(split, {}).get("files", {})
    for name in split_files(split, manifest["settings"]["format"] == "lm"):
        path = out / name
        if not path.is_file() or path.stat().st_size != recorded.get(name, {}).get("bytes"):
            return False
    return True


def _write_ids(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Write one prepared file; return its manifest entry (size and SHA-256)."""
    atomic_write_bytes(path, array.tobytes())
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def _binarize(
    data: DataConfig,
    split: str,
    out: Path,
    dtype: np.dtype,
    tokenizer: Tokenizer | None,
    workers: int,
) -> dict[str, Any]:
    sampled = data.sampled_splits()
    sample = sampled.index(split) + 1 if split in sampled else 0  # 0: the one segmentation
    text_split = data.train_split if sample else split
    chunks = _chunks(read_parallel(data, text_split), _CHUNK_EXAMPLES)
    alpha = data.subword_alpha if sample else 0.0
    parts: dict[str, tuple[list, list]] = {"src": ([], []), "tgt": ([], [])}  # ids, lengths
    n_empty = n_long = seen = 0
    limits = (data.max_source_len - 1, data.max_target_len - 1)  # room for EOS / BOS
    with tqdm(desc=f"encode {split}", unit=" ex", file=sys.stderr, disable=None) as progress:
        encoding = _encode(chunks, tokenizer, out / TOKENIZER_DIR, workers, split, alpha, sample)
        for encoded in encoding:
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
    stats: dict[str, Any] = {"examples": kept, "dropped_empty": int(n_empty), "files": {}}
    stats["truncated" if data.truncate else "dropped_too_long"] = int(n_long)
    print(
        f"prepare: {split}: kept {kept} of {seen} examples; dropped {n_empty} with an empty side "
        f"and {'truncated ' * data.truncate}{n_long} longer than {data.max_source_len} source / "
        f"{data.max_target_len} target tokens (EOS or BOS included)"
    )
    for side, (ids, lengths) in parts.items():
        lengths = np.concatenate(lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        for name, array in (
            (f"{split}.{side}.bin", np.concatenate(ids)),
            (f"{split}.{side}.idx", offsets),
        ):
            stats["files"][name] = _write_ids(out / name, array)
        stats[f"{side}_tokens"] = _length_stats(lengths + 1)
        print(f"prepare: {split}: {side} lengths with EOS/BOS: {stats[f'{side}_tokens']}")
    return stats


def _prepare_lm(data: DataConfig, out: Path, settings: dict[str, Any], workers: int) -> None:
    text = read_lm_text(data)
    print(f"prepare: training the {data.tokenizer} tokenizer on {data.path} ({len(text)} chars)")
    lines = _cut_after_newlines(text, 0)
    threads = max(1, workers)
    tokenizer = train_tokenizer(data, lines, None, out / TOKENIZER_DIR, num_threads=threads)
    manifest = new_manifest(settings, tokenizer)
    pieces = _cut_after_newlines(text, _CHUNK_CHARS)
    chunks = _chunks(((piece, "") for piece in pieces), 1)
    encoded = _encode(chunks, tokenizer, out / TOKENIZER_DIR, workers, data.train_split)
    progress = tqdm(encoded, desc="encode", unit=" chunk", file=sys.stderr, disable=None)
    ids = np.concatenate([ids for (ids, _), _ in progress]).astype(manifest["dtype"])
    n_valid = int(len(ids) * data.valid_fraction)
    if n_valid == 0 or n_valid == len(ids):
        raise DataError(f"{data.path}: {len(ids)} tokens cannot be split by valid_fraction")
    for split, part in ((data.train_split, ids[:-n_valid]), (data.valid_split, ids[-n_valid:])):
        name = f"{split}.lm.bin"
        manifest["splits"][split] = {
            "tokens": len(part),
            "files": {name: _write_ids(out / name, part)},
        }
        print(f"prepare: {split}: {len(part)} tokens")
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))


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
    chunks: Iterable[list[tuple[str, str]]],
    tokenizer: Tokenizer | None,
    tokenizer_dir: Path,
    workers: int,
    what: str,
    alpha: float = 0.0,
    sample: int = 0,
) -> Iterator[Encoded]:
    """Encode chunks in order, in ``workers`` processes, keeping few chunks in flight.

    With one worker or fewer this process encodes with ``tokenizer``; worker processes each
    load it from ``tokenizer_dir`` once. ``alpha`` > 0 samples the segmentations, seeded by
    (``sample``, chunk number), so that the output does not depend on the number of workers.

    Raises:
        DataError: a worker process died (the pool cannot finish the split).
    """
    if workers <= 1:
        assert tokenizer is not None, "the single-process path encodes with the caller's tokenizer"
        for number, chunk in enumerate(chunks):
            yield _encode_pairs(chunk, tokenizer, alpha, _chunk_seed(sample, number))
        return
    pool = ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(tokenizer_dir),))
    try:
        pending: collections.deque = collections.deque()
        for number, chunk in enumerate(chunks):
            seed = _chunk_seed(sample, number)
            pending.append(pool.submit(_encode_pairs, chunk, None, alpha, seed))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool as error:
        raise DataError(
            f"prepare: a worker process died while encoding {what!r} (killed for lack of "
            f"memory?); try fewer prepare.num_workers (now {workers})"
        ) from error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(tokenizer_dir)


def _chunk_seed(sample: int, number: int) -> int:
    """SentencePiece's seed for a chunk's source side (its target side: the next one)."""
    return (sample * 1_000_003 + 2 * number) % (1 << 32)


def _encode_pairs(
    chunk: list[tuple[str, str]],
    tokenizer: Tokenizer | None = None,
    alpha: float = 0.0,
    seed: int = 0,
) -> Encoded:
    """Flat int32 ids and per-example piece counts for each side (sampled when ``alpha``)."""
    tokenizer = tokenizer or _worker_tokenizer  # the worker's, loaded by _init_worker
    sources, targets = [s for s, _ in chunk], [t for _, t in chunk]
    if alpha > 0:
        sides = (
            tokenizer.sample_batch("source", sources, alpha, seed),
            tokenizer.sample_batch("target", targets, alpha, seed + 1),
        )
    else:
        sides = (tokenizer.encode_source_batch(sources), tokenizer.encode_target_batch(targets))
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
        print(
            "prepare: data settings:", json.dumps(dataclasses.asdict(config.data), sort_keys=True)
        )
        splits = [s for s in args.splits.split(",") if s] or None
        out = prepare(config, splits, force=args.force)
    except (DataError, ConfigError, TokenizerError) as error:
        print(f"seq2seq prepare: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # writing the output: a full disk, permissions
        where = f"{error.filename}: " if error.filename else ""
        print(f"seq2seq prepare: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    print(f"prepare: done: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
