"""Prepared corpora in, token-budget batches out: the online half of the data flow.

Flow: ``TokenizedCorpus`` / ``LMCorpus`` (memory-mapped ids, verified against the manifest) ->
``batch_indices`` (token budget) -> ``collate`` -> ``Batch``; ``lm_batch`` for a language model.
``seq2seq.prepare`` writes what this module reads.

Shapes: b batch, s source length (pieces + EOS), t target length (BOS + pieces, or pieces + EOS;
for a language model the block size).

A prepared directory holds::

    manifest.json           the data section it was built from, counts, length statistics,
                            id dtype, and each file's size and SHA-256
    tokenizer/              Tokenizer.save
    {split}.src.bin / .idx  flat piece ids (uint16 when the vocabulary has < 65536 ids, else int32)
    {split}.tgt.bin / .idx  and int64 offsets, n_examples + 1 of them
    {split}.lm.bin          language modelling: the split's whole id stream

Opening a split checks every file's size and SHA-256 and that every id lies inside the
vocabulary, so a corrupt file is a :class:`DataError` naming it, never an ``IndexError`` later.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from seq2seq.textio import sha256_file
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"


class DataError(ValueError):
    """Unreadable or malformed data; the message names the file, line (1-based) and problem."""


def split_files(split: str, lm: bool) -> list[str]:
    """The file names that hold one prepared split."""
    if lm:
        return [f"{split}.lm.bin"]
    return [f"{split}.{side}.{ext}" for side in ("src", "tgt") for ext in ("bin", "idx")]


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a prepared directory, or None when there is none (or it is unreadable)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


sha256 = sha256_file  # prepare.py and the manifest checks call it by this name


def _open_split(directory: Path, split: str, verify: bool) -> tuple[np.dtype, dict[str, int]]:
    """Check one split against the manifest; return its id dtype and vocabulary sizes."""
    where = directory / MANIFEST
    manifest = read_manifest(directory)
    if manifest is None or split not in manifest.get("splits", {}):
        raise DataError(f"{where}: split {split!r} is not prepared; run prepare")
    files = manifest["splits"][split].get("files")
    if not isinstance(files, dict):
        raise DataError(f"{where}: no checksums (prepared by an older version); run prepare again")
    for name in split_files(split, manifest["settings"]["format"] == "lm"):
        path, expected = directory / name, files.get(name, {})
        try:
            size = path.stat().st_size
        except OSError as error:
            raise DataError(f"{path}: cannot open prepared data: {error.strerror}") from error
        if size != expected.get("bytes"):
            raise DataError(
                f"{path}: {size} bytes, but {MANIFEST} records {expected.get('bytes')}; "
                "the file is damaged: run prepare --force"
            )
        if verify and sha256(path) != expected.get("sha256"):
            raise DataError(
                f"{path}: SHA-256 does not match {MANIFEST}; the file is damaged: "
                "run prepare --force"
            )
    tokenizer = manifest["tokenizer"]
    return np.dtype(manifest["dtype"]), {
        "src": tokenizer["src_vocab_size"],
        "tgt": tokenizer["tgt_vocab_size"],
    }


def _check_ids(path: Path, ids: np.ndarray, vocab_size: int) -> None:
    if len(ids) and int(ids.max()) >= vocab_size:
        bad = int(np.argmax(ids >= vocab_size))
        raise DataError(
            f"{path}: id {int(ids[bad])} at position {bad} is outside the vocabulary of "
            f"{vocab_size}; the file is damaged: run prepare --force"
        )


class TokenizedCorpus:
    """One prepared split of a parallel corpus, memory-mapped.

    Attributes:
        src_lengths: (n,) int64, source pieces + 1 (EOS).
        tgt_lengths: (n,) int64, target pieces + 1 (BOS, or EOS in the output).
    """

    def __init__(self, directory: str | Path, split: str, verify: bool = True) -> None:
        """Open and check one split.

        Args:
            verify: also compare each file's SHA-256 with the manifest (sizes, offsets and the
                id range are always checked).

        Raises:
            DataError: the split is not prepared, or a file is damaged (the message names it).
        """
        self.directory, self.split = Path(directory), split
        dtype, vocab = _open_split(self.directory, split, verify)
        self._src, self._src_offsets = _open_ids(self.directory / f"{split}.src", dtype)
        self._tgt, self._tgt_offsets = _open_ids(self.directory / f"{split}.tgt", dtype)
        if len(self._src_offsets) != len(self._tgt_offsets):
            raise DataError(f"{self.directory}: {split}.src.idx and {split}.tgt.idx disagree")
        self.src_lengths = np.diff(self._src_offsets) + 1
        self.tgt_lengths = np.diff(self._tgt_offsets) + 1
        for side, offsets in (("src", self._src_offsets), ("tgt", self._tgt_offsets)):
            if offsets[0] != 0 or (np.diff(offsets) < 0).any():
                raise DataError(f"{self.directory / f'{split}.{side}.idx'}: offsets out of order")
        _check_ids(self.directory / f"{split}.src.bin", self._src, vocab["src"])
        _check_ids(self.directory / f"{split}.tgt.bin", self._tgt, vocab["tgt"])

    def __len__(self) -> int:
        return len(self.src_lengths)

    def source(self, i: int) -> np.ndarray:
        return self._src[self._src_offsets[i] : self._src_offsets[i + 1]]

    def target(self, i: int) -> np.ndarray:
        return self._tgt[self._tgt_offsets[i] : self._tgt_offsets[i + 1]]

    def __getstate__(self) -> dict[str, Any]:  # reopen the maps instead of pickling their data
        return {"directory": self.directory, "split": self.split}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["split"], verify=False)  # checked when opened


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
                "raise batch.max_tokens, or lower data.max_source_len/max_target_len"
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

    def __init__(self, directory: str | Path, split: str, verify: bool = True) -> None:
        """Open and check one split (as :class:`TokenizedCorpus` does).

        Raises:
            DataError: the split is not prepared, or its file is damaged.
        """
        self.directory, self.split = Path(directory), split
        dtype, vocab = _open_split(self.directory, split, verify)
        path = self.directory / f"{split}.lm.bin"
        self.ids = np.memmap(path, dtype=dtype, mode="r")
        _check_ids(path, self.ids, vocab["src"])

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
