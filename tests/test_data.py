"""Data: opening prepared corpora (and refusing damaged ones), token-budget batches, LM blocks."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from seq2seq.data import (
    DataError,
    LMCorpus,
    TokenizedCorpus,
    batch_indices,
    collate,
    lm_batch,
    lm_eval_batches,
)
from seq2seq.prepare import prepare
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

# ------------------------------------------------------------------------------------- batches


def fake_corpus(n: int, seed: int = 0) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    src = rng.integers(2, 60, n)
    tgt = np.maximum(src + rng.integers(-4, 5, n), 2)  # translations have similar lengths
    return SimpleNamespace(src_lengths=src, tgt_lengths=tgt)


@pytest.mark.parametrize("max_tokens", [64, 257, 1000])
def test_batches_respect_the_budget_and_cover_every_example_once(max_tokens):
    corpus = fake_corpus(3000)
    batches = batch_indices(corpus, max_tokens, seed=1, epoch=0)
    together = np.concatenate(batches)
    assert np.array_equal(np.sort(together), np.arange(3000))
    for batch in batches:
        longest = max(corpus.src_lengths[batch].max(), corpus.tgt_lengths[batch].max())
        assert len(batch) * longest <= max_tokens
    if max_tokens >= 1000:  # greedy filling of length-sorted examples: batches are nearly full
        real = sum(max(corpus.src_lengths[b].sum(), corpus.tgt_lengths[b].sum()) for b in batches)
        assert real / (len(batches) * max_tokens) > 0.8


def test_batches_are_deterministic_per_seed_and_epoch():
    corpus = fake_corpus(2000)
    first = batch_indices(corpus, 500, seed=3, epoch=1)
    again = batch_indices(corpus, 500, seed=3, epoch=1)
    assert len(first) == len(again) and all(np.array_equal(a, b) for a, b in zip(first, again))
    other = batch_indices(corpus, 500, seed=3, epoch=2)
    assert [b.tolist() for b in first] != [b.tolist() for b in other]
    assert {tuple(sorted(b.tolist())) for b in first} != {tuple(sorted(b.tolist())) for b in other}


def test_an_example_wider_than_the_budget_is_an_error():
    corpus = SimpleNamespace(src_lengths=np.array([5, 80]), tgt_lengths=np.array([5, 5]))
    with pytest.raises(DataError, match="example 1 has 80 tokens, more than max_tokens=64"):
        batch_indices(corpus, 64, seed=0, epoch=0)


def test_collate_pads_and_adds_bos_eos():
    ids = {0: ([10, 11, 12], [20, 21]), 1: ([13], [22, 23, 24, 25])}
    corpus = SimpleNamespace(
        src_lengths=np.array([4, 2]),
        tgt_lengths=np.array([3, 5]),
        source=lambda i: np.array(ids[i][0], dtype=np.uint16),
        target=lambda i: np.array(ids[i][1], dtype=np.uint16),
    )
    batch = collate(corpus, np.array([1, 0]))
    p, b, e = PAD_ID, BOS_ID, EOS_ID
    assert batch.src.tolist() == [[13, e, p, p], [10, 11, 12, e]]
    assert batch.tgt_in.tolist() == [[b, 22, 23, 24, 25], [b, 20, 21, p, p]]
    assert batch.tgt_out.tolist() == [[22, 23, 24, 25, e], [20, 21, e, p, p]]
    assert batch.src.dtype == torch.long and batch.tgt_in.dtype == torch.long
    assert (batch.n_src_tokens, batch.n_tgt_tokens) == (6, 8)
    moved = batch.to("cpu")
    assert torch.equal(moved.tgt_out, batch.tgt_out) and moved.n_tgt_tokens == 8


def test_collate_on_a_prepared_corpus_fits_the_budget(tmp_path, toy):
    toy.write(tmp_path / "corpus", "train", toy.pairs(300))
    toy.write(tmp_path / "corpus", "val", toy.pairs(10, seed=1))
    corpus = TokenizedCorpus(prepare(toy.config(tmp_path)), "train")
    seen = 0
    for indices in batch_indices(corpus, 200, seed=0, epoch=0):
        batch = collate(corpus, indices)
        assert batch.src.numel() <= 200 and batch.tgt_in.numel() <= 200
        assert batch.n_tgt_tokens == int((batch.tgt_out != PAD_ID).sum())
        assert (batch.src == EOS_ID).sum() == len(indices)
        seen += len(indices)
    assert seen == 300


# ------------------------------------------------------------------------------------------ LM


@pytest.fixture
def lm_dir(tmp_path, toy) -> tuple[Path, str]:
    rng = random.Random(0)
    lines = [
        " ".join(rng.choice(toy.words_en) for _ in range(rng.randint(1, 8))) for _ in range(400)
    ]
    text = "\n".join(lines) + "\n"
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    config = toy.config(tmp_path, format="lm", path=str(tmp_path / "input.txt"), tokenizer="char")
    return prepare(config), text


def test_lm_prepare_splits_the_stream(lm_dir):
    out, text = lm_dir
    train, valid = LMCorpus(out, "train"), LMCorpus(out, "val")
    assert len(train) + len(valid) == len(text)
    assert len(valid) == int(len(text) * 0.1)
    tokenizer = Tokenizer.load(out / "tokenizer")
    assert tokenizer.decode_target(np.concatenate([train.ids, valid.ids])) == text


def test_lm_batches_are_shifted_blocks(lm_dir):
    out, _ = lm_dir
    corpus = LMCorpus(out, "train")
    batch = lm_batch(
        corpus, block_size=16, batch_size=8, generator=torch.Generator().manual_seed(0)
    )
    assert batch.src is None and batch.tgt_in.shape == batch.tgt_out.shape == (8, 16)
    assert torch.equal(batch.tgt_in[:, 1:], batch.tgt_out[:, :-1])
    stream = torch.from_numpy(corpus.ids.astype(np.int64))
    for row_in, row_out in zip(batch.tgt_in, batch.tgt_out):
        windows = stream.unfold(0, 17, 1)  # every block of 17 in the stream
        matches = (windows == torch.cat([row_in, row_out[-1:]])).all(dim=1)
        assert matches.any()  # the block is a real, in-range window of the stream
    assert batch.n_tgt_tokens == 8 * 16
    again = lm_batch(corpus, 16, 8, torch.Generator().manual_seed(0))
    assert torch.equal(again.tgt_in, batch.tgt_in)
    other = lm_batch(corpus, 16, 8, torch.Generator().manual_seed(1))
    assert not torch.equal(other.tgt_in, batch.tgt_in)
    evals = lm_eval_batches(LMCorpus(out, "val"), 16, 4, n_batches=3, seed=7)
    evals_again = lm_eval_batches(LMCorpus(out, "val"), 16, 4, n_batches=3, seed=7)
    assert len(evals) == 3
    assert all(torch.equal(a.tgt_out, b.tgt_out) for a, b in zip(evals, evals_again))
    with pytest.raises(DataError, match="fewer than block_size"):
        lm_batch(corpus, len(corpus), 1, torch.Generator())


# ------------------------------------------------------------------ damaged prepared data


@pytest.fixture
def prepared(tmp_path, toy) -> Path:
    toy.write(tmp_path / "corpus", "train", toy.pairs(40))
    toy.write(tmp_path / "corpus", "val", toy.pairs(5, seed=1))
    return prepare(toy.config(tmp_path))


def _rewrite(directory: Path, name: str, payload: bytes, fix_checksum: bool) -> None:
    (directory / name).write_bytes(payload)
    if fix_checksum:  # as if the checksums had been regenerated over the damage
        manifest = json.loads((directory / "manifest.json").read_text())
        split = name.split(".")[0]
        entry = manifest["splits"][split]["files"][name]
        entry["sha256"] = hashlib.sha256(payload).hexdigest()
        (directory / "manifest.json").write_text(json.dumps(manifest))


def test_a_flipped_bit_is_named_at_load_time(prepared):
    payload = bytearray((prepared / "train.tgt.bin").read_bytes())
    payload[6] ^= 0x01  # the low bit of an id: still inside the vocabulary
    _rewrite(prepared, "train.tgt.bin", bytes(payload), fix_checksum=False)
    with pytest.raises(DataError, match=r"train\.tgt\.bin: SHA-256 does not match manifest"):
        TokenizedCorpus(prepared, "train")
    assert len(TokenizedCorpus(prepared, "train", verify=False)) == 40  # the range check passes


def test_an_out_of_range_id_is_a_data_error_not_an_index_error(prepared):
    ids = np.fromfile(prepared / "train.src.bin", dtype=np.uint16)
    ids[11] = 60  # the vocabulary has 60 ids
    _rewrite(prepared, "train.src.bin", ids.tobytes(), fix_checksum=True)
    with pytest.raises(DataError, match=r"train\.src\.bin: id 60 at position 11 is outside the"):
        TokenizedCorpus(prepared, "train", verify=False)
    _rewrite(prepared, "train.src.bin", ids[:-1].tobytes(), fix_checksum=True)
    with pytest.raises(DataError, match=r"train\.src\.bin: \d+ bytes, but manifest\.json records"):
        TokenizedCorpus(prepared, "train")


def test_an_lm_stream_with_an_out_of_range_id_is_refused(lm_dir):
    out, _ = lm_dir
    ids = np.fromfile(out / "val.lm.bin", dtype=np.uint16)
    ids[-1] = 999
    _rewrite(out, "val.lm.bin", ids.tobytes(), fix_checksum=True)
    with pytest.raises(DataError, match=r"val\.lm\.bin: id 999 at position \d+ is outside"):
        LMCorpus(out, "val")
    assert len(LMCorpus(out, "train")) > 0
