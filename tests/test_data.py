"""Data: readers and their errors, prepare (filtering, idempotence), token-budget batches, LM."""

from __future__ import annotations

import gzip
import itertools
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from seq2seq.config import config_from_dict
from seq2seq.data import (
    DataError,
    LMCorpus,
    TokenizedCorpus,
    batch_indices,
    collate,
    lm_batch,
    lm_eval_batches,
    main,
    prepare,
    read_lm_text,
    read_parallel,
)
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

WORDS_DE = "der die das ein haus katze hund baum auto fährt schnell rot blau groß klein".split()
WORDS_EN = "the a house cat dog tree car drives fast red blue big small green old".split()


def make_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        length = rng.randint(2, 10)
        src = " ".join(rng.choice(WORDS_DE) for _ in range(length))
        tgt = " ".join(rng.choice(WORDS_EN) for _ in range(length + rng.randint(-1, 2)))
        pairs.append((src, tgt))
    return pairs


def write_text(folder: Path, split: str, pairs, gz: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for lang, side in (("de", 0), ("en", 1)):
        payload = "".join(pair[side] + "\n" for pair in pairs).encode("utf-8")
        name = folder / f"{split}.{lang}"
        if gz:
            Path(f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            name.write_bytes(payload)


def make_config(tmp_path: Path, **data):
    data = {"path": str(tmp_path / "corpus"), "vocab_size": 60, "num_workers": 1, **data}
    model = {"preset": "gpt_mini"} if data.get("format") == "lm" else {}
    return config_from_dict(
        {"model": model, "data": data, "train": {"out_dir": str(tmp_path / "run")}}
    )


# ------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("gz", [False, True])
def test_read_text_plain_and_gz(tmp_path, gz):
    pairs = make_pairs(30)
    write_text(tmp_path / "corpus", "train", pairs, gz=gz)
    assert list(read_parallel(make_config(tmp_path).data, "train")) == pairs


def test_read_tsv_and_jsonl_with_dotted_fields(tmp_path):
    pairs = make_pairs(10)
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    records = [{"translation": {"de": s, "en": t}, "id": i} for i, (s, t) in enumerate(pairs)]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    assert list(read_parallel(make_config(tmp_path, format="tsv").data, "train")) == pairs
    fields = {"src_field": "translation.de", "tgt_field": "translation.en"}
    jsonl = make_config(tmp_path, format="jsonl", **fields).data
    assert list(read_parallel(jsonl, "train")) == pairs


def test_read_hf_from_a_local_folder(tmp_path):
    pairs = make_pairs(12)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, part in (("train", pairs[:8]), ("validation", pairs[8:])):
        rows = [json.dumps({"translation": {"de": s, "en": t}}) for s, t in part]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    fields = {"src_field": "translation.de", "tgt_field": "translation.en"}
    data = make_config(tmp_path, format="hf", **fields).data
    assert list(read_parallel(data, "train")) == pairs[:8]
    assert list(read_parallel(data, "validation")) == pairs[8:]
    bad = make_config(tmp_path, format="hf", src_field="text.de", tgt_field="translation.en").data
    with pytest.raises(DataError, match=r"no column 'text'; available columns: \['translation'\]"):
        list(read_parallel(bad, "train"))
    with pytest.raises(DataError, match="could not load split 'val'.*validation"):
        list(read_parallel(data, "val"))
    (tmp_path / "empty").mkdir()
    empty = make_config(tmp_path, format="hf", path=str(tmp_path / "empty"), **fields).data
    with pytest.raises(DataError, match="could not load split"):
        list(read_parallel(empty, "train"))


def test_mismatched_line_counts_name_both_files(tmp_path):
    write_text(tmp_path / "corpus", "train", make_pairs(5))
    with open(tmp_path / "corpus" / "train.en", "a", encoding="utf-8") as extra:
        extra.write("one more\nand another\n")
    with pytest.raises(DataError, match=r"train\.de has 5 lines but .*train\.en has 7"):
        list(read_parallel(make_config(tmp_path).data, "train"))


def test_invalid_utf8_names_file_and_line(tmp_path):
    write_text(tmp_path / "corpus", "train", make_pairs(5))
    path = tmp_path / "corpus" / "train.en"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = b"caf\xe9 latte\n"
    path.write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=r"train\.en:4: invalid UTF-8"):
        list(read_parallel(make_config(tmp_path).data, "train"))


def test_jsonl_errors_name_file_and_line(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    good = json.dumps({"a": "x", "b": {"c": "y"}})
    (folder / "train.jsonl").write_text(f"{good}\n{good}\n{{oops\n", encoding="utf-8")
    data = make_config(tmp_path, format="jsonl", src_field="a", tgt_field="b.c").data
    with pytest.raises(DataError, match=r"train\.jsonl:3: invalid JSON"):
        list(read_parallel(data, "train"))
    (folder / "train.jsonl").write_text(f"{good}\n" + json.dumps({"a": "x", "b": {}}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: no field 'b\.c'.*available keys: \[\]"):
        list(read_parallel(data, "train"))
    (folder / "train.jsonl").write_text(json.dumps({"z": "x", "b": {"c": "y"}}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:1: no field 'a'.*\['b', 'z'\]"):
        list(read_parallel(data, "train"))


def test_tsv_with_wrong_column_count(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "train.tsv").write_text("a\tb\nc\td\te\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.tsv:2: expected 2 tab-separated columns.*3"):
        list(read_parallel(make_config(tmp_path, format="tsv").data, "train"))


def test_missing_and_empty_files(tmp_path):
    (tmp_path / "corpus").mkdir()
    data = make_config(tmp_path).data
    with pytest.raises(DataError, match=r"corpus/train\.de: file not found \(nor train\.de\.gz\)"):
        list(read_parallel(data, "train"))
    (tmp_path / "corpus" / "train.de").write_text("")
    (tmp_path / "corpus" / "train.en").write_text("hello\n")
    with pytest.raises(DataError, match=r"train\.de: file is empty"):
        list(read_parallel(data, "train"))
    lm = make_config(tmp_path, format="lm", path=str(tmp_path / "corpus" / "train.de")).data
    with pytest.raises(DataError, match="file is empty"):
        read_lm_text(lm)
    (tmp_path / "corpus" / "bad.txt").write_bytes(b"fine\nstill fine\n\xff\n")
    lm = make_config(tmp_path, format="lm", path=str(tmp_path / "corpus" / "bad.txt")).data
    with pytest.raises(DataError, match=r"bad\.txt:3: invalid UTF-8"):
        read_lm_text(lm)


# ------------------------------------------------------------------------------------- prepare


def test_prepare_filters_reports_and_round_trips(tmp_path, capsys):
    pairs = make_pairs(200)
    pairs[5] = ("", "an empty source")
    pairs[9] = ("ein leeres ziel", "")
    pairs[20] = (" ".join(["katze"] * 100), "cat")  # >= 100 pieces
    pairs[30] = ("katze", " ".join(["green"] * 100))
    write_text(tmp_path / "corpus", "train", pairs)
    write_text(tmp_path / "corpus", "val", make_pairs(20, seed=1))
    config = make_config(tmp_path, max_source_len=80, max_target_len=80)
    out = prepare(config)
    printed = capsys.readouterr().out
    assert "kept 196 of 200 examples; dropped 2 with an empty side and 2 longer" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert (train["examples"], train["dropped_empty"], train["dropped_too_long"]) == (196, 2, 2)
    assert manifest["dtype"] == "uint16"
    corpus = TokenizedCorpus(out, "train")
    kept = [p for i, p in enumerate(pairs) if i not in (5, 9, 20, 30)]
    assert len(corpus) == len(kept)
    tokenizer = Tokenizer.load(out / "tokenizer")
    for i in (0, 17, 100, len(kept) - 1):
        assert tokenizer.decode_source(corpus.source(i)) == kept[i][0]
        assert tokenizer.decode_target(corpus.target(i)) == kept[i][1]
        assert corpus.src_lengths[i] == len(tokenizer.encode_source(kept[i][0])) + 1
    assert corpus.src_lengths.max() <= 80 and corpus.tgt_lengths.max() <= 80
    assert train["src_tokens"]["total"] == int(corpus.src_lengths.sum())
    assert len(TokenizedCorpus(out, "val")) == 20


def test_prepare_is_idempotent_and_redoes_changed_settings(tmp_path, capsys):
    write_text(tmp_path / "corpus", "train", make_pairs(100))
    write_text(tmp_path / "corpus", "val", make_pairs(10, seed=1))
    write_text(tmp_path / "corpus", "test", make_pairs(10, seed=2))
    out = prepare(make_config(tmp_path))
    stamp = (out / "train.src.bin").stat().st_mtime_ns
    capsys.readouterr()
    assert prepare(make_config(tmp_path, max_tokens=99, num_workers=2)) == out
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "train.src.bin").stat().st_mtime_ns == stamp
    prepare(make_config(tmp_path), splits=["test"])  # a new split only
    assert (out / "train.src.bin").stat().st_mtime_ns == stamp
    assert len(TokenizedCorpus(out, "test")) == 10
    prepare(make_config(tmp_path, vocab_size=50))
    assert "data settings changed (vocab_size)" in capsys.readouterr().out
    assert (out / "train.src.bin").stat().st_mtime_ns != stamp
    assert Tokenizer.load(out / "tokenizer").src_vocab_size == 50
    with pytest.raises(DataError, match="'test' is not prepared"):
        TokenizedCorpus(out, "test")  # the old test split went with the old tokenizer


def test_worker_processes_give_the_same_ids(tmp_path):
    write_text(tmp_path / "corpus", "train", make_pairs(5000))
    write_text(tmp_path / "corpus", "val", make_pairs(10, seed=1))
    one = prepare(make_config(tmp_path, prepared_dir=str(tmp_path / "one")))
    two = prepare(make_config(tmp_path, prepared_dir=str(tmp_path / "two"), num_workers=2))
    for name in ("train.src.bin", "train.src.idx", "train.tgt.bin", "train.tgt.idx"):
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_prepare_on_a_multi30k_slice(tmp_path, shared_data):
    for split, n in (("train", 2000), ("val", 200)):
        for lang in ("de", "en"):
            with gzip.open(shared_data / "multi30k" / f"{split}.{lang}.gz", "rt") as file:
                lines = list(itertools.islice(file, n))
            (tmp_path / "corpus").mkdir(exist_ok=True)
            (tmp_path / "corpus" / f"{split}.{lang}").write_text("".join(lines), encoding="utf-8")
    out = prepare(make_config(tmp_path, vocab_size=1000, num_workers=2))
    corpus = TokenizedCorpus(out, "train")
    assert 1990 <= len(corpus) <= 2000
    tokenizer = Tokenizer.load(out / "tokenizer")
    first_de = (tmp_path / "corpus" / "train.de").read_text(encoding="utf-8").splitlines()[0]
    assert tokenizer.decode_source(corpus.source(0)) == first_de
    # subword units: far fewer pieces than characters, more than words
    mean = corpus.src_lengths.mean()
    assert 10 < mean < 40


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


def test_collate_on_a_prepared_corpus_fits_the_budget(tmp_path):
    write_text(tmp_path / "corpus", "train", make_pairs(300))
    write_text(tmp_path / "corpus", "val", make_pairs(10, seed=1))
    corpus = TokenizedCorpus(prepare(make_config(tmp_path)), "train")
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
def lm_dir(tmp_path) -> tuple[Path, str]:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS_EN) for _ in range(rng.randint(1, 8))) for _ in range(400)]
    text = "\n".join(lines) + "\n"
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    config = make_config(tmp_path, format="lm", path=str(tmp_path / "input.txt"), tokenizer="char")
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


# ----------------------------------------------------------------------------------------- CLI


def test_cli_prepares_and_reports_errors(tmp_path, capsys):
    write_text(tmp_path / "corpus", "train", make_pairs(50))
    write_text(tmp_path / "corpus", "val", make_pairs(5, seed=1))
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  path: {tmp_path / 'corpus'}\n  vocab_size: 50\n")
    out_dir = f"train.out_dir={tmp_path / 'run'}"
    assert main([str(config), out_dir]) == 0
    assert (tmp_path / "run" / "data" / "val.tgt.bin").is_file()
    assert main([str(config), out_dir, "data.path=/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seq2seq prepare: error: /nonexistent/train.de: file not found")
    assert main([str(config), "data.nonsense=1"]) == 2
    assert "data.nonsense: unknown key" in capsys.readouterr().err
