"""Prepare: readers and their errors, filtering, idempotence, section fingerprints, worker
processes (and their death), failed writes, checksums written for the loader."""

from __future__ import annotations

import errno
import gzip
import hashlib
import importlib
import io
import itertools
import json
import os
import signal
import subprocess

import numpy as np
import pytest

from seq2seq.config import ConfigError, config_from_dict
from seq2seq.data import DataError, TokenizedCorpus
from seq2seq.prepare import data_fingerprint, main, prepare
from seq2seq.readers import read_lm_text, read_parallel
from seq2seq.tokenizer import Tokenizer

prepare_module = importlib.import_module("seq2seq.prepare")  # the module, not its function

# ------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("gz", [False, True])
def test_read_text_plain_and_gz(tmp_path, gz, toy):
    pairs = toy.pairs(30)
    toy.write(tmp_path / "corpus", "train", pairs, gz=gz)
    assert list(read_parallel(toy.config(tmp_path).data, "train")) == pairs


def test_read_tsv_and_jsonl_with_dotted_fields(tmp_path, toy):
    pairs = toy.pairs(10)
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    records = [{"translation": {"de": s, "en": t}, "id": i} for i, (s, t) in enumerate(pairs)]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    assert list(read_parallel(toy.config(tmp_path, format="tsv").data, "train")) == pairs
    fields = {"src_field": "translation.de", "tgt_field": "translation.en"}
    jsonl = toy.config(tmp_path, format="jsonl", **fields).data
    assert list(read_parallel(jsonl, "train")) == pairs


def test_read_hf_from_a_local_folder(tmp_path, toy):
    pairs = toy.pairs(12)
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split, part in (("train", pairs[:8]), ("validation", pairs[8:])):
        rows = [json.dumps({"translation": {"de": s, "en": t}}) for s, t in part]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    fields = {"src_field": "translation.de", "tgt_field": "translation.en"}
    data = toy.config(tmp_path, format="hf", **fields).data
    assert list(read_parallel(data, "train")) == pairs[:8]
    assert list(read_parallel(data, "validation")) == pairs[8:]
    bad = toy.config(tmp_path, format="hf", src_field="text.de", tgt_field="translation.en").data
    with pytest.raises(DataError, match=r"no column 'text'; available columns: \['translation'\]"):
        list(read_parallel(bad, "train"))
    with pytest.raises(DataError, match="could not load split 'val'.*validation"):
        list(read_parallel(data, "val"))
    (tmp_path / "empty").mkdir()
    empty = toy.config(tmp_path, format="hf", path=str(tmp_path / "empty"), **fields).data
    with pytest.raises(DataError, match="could not load split"):
        list(read_parallel(empty, "train"))


def test_mismatched_line_counts_name_both_files(tmp_path, toy):
    toy.write(tmp_path / "corpus", "train", toy.pairs(5))
    with open(tmp_path / "corpus" / "train.en", "a", encoding="utf-8") as extra:
        extra.write("one more\nand another\n")
    with pytest.raises(DataError, match=r"train\.de has 5 lines but .*train\.en has 7"):
        list(read_parallel(toy.config(tmp_path).data, "train"))


def test_invalid_utf8_names_file_and_line(tmp_path, toy):
    toy.write(tmp_path / "corpus", "train", toy.pairs(5))
    path = tmp_path / "corpus" / "train.en"
    lines = path.read_bytes().splitlines(keepends=True)
    lines[3] = b"caf\xe9 latte\n"
    path.write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=r"train\.en:4: invalid UTF-8"):
        list(read_parallel(toy.config(tmp_path).data, "train"))


def test_jsonl_errors_name_file_and_line(tmp_path, toy):
    folder = tmp_path / "corpus"
    folder.mkdir()
    good = json.dumps({"a": "x", "b": {"c": "y"}})
    (folder / "train.jsonl").write_text(f"{good}\n{good}\n{{oops\n", encoding="utf-8")
    data = toy.config(tmp_path, format="jsonl", src_field="a", tgt_field="b.c").data
    with pytest.raises(DataError, match=r"train\.jsonl:3: invalid JSON"):
        list(read_parallel(data, "train"))
    (folder / "train.jsonl").write_text(f"{good}\n" + json.dumps({"a": "x", "b": {}}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:2: no field 'b\.c'.*available keys: \[\]"):
        list(read_parallel(data, "train"))
    (folder / "train.jsonl").write_text(json.dumps({"z": "x", "b": {"c": "y"}}) + "\n")
    with pytest.raises(DataError, match=r"train\.jsonl:1: no field 'a'.*\['b', 'z'\]"):
        list(read_parallel(data, "train"))


def test_tsv_with_wrong_column_count(tmp_path, toy):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "train.tsv").write_text("a\tb\nc\td\te\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.tsv:2: expected 2 tab-separated columns.*3"):
        list(read_parallel(toy.config(tmp_path, format="tsv").data, "train"))


def test_missing_and_empty_files(tmp_path, toy):
    (tmp_path / "corpus").mkdir()
    data = toy.config(tmp_path).data
    with pytest.raises(DataError, match=r"corpus/train\.de: file not found \(nor train\.de\.gz\)"):
        list(read_parallel(data, "train"))
    (tmp_path / "corpus" / "train.de").write_text("")
    (tmp_path / "corpus" / "train.en").write_text("hello\n")
    with pytest.raises(DataError, match=r"train\.de: file is empty"):
        list(read_parallel(data, "train"))
    lm = toy.config(tmp_path, format="lm", path=str(tmp_path / "corpus" / "train.de")).data
    with pytest.raises(DataError, match="file is empty"):
        read_lm_text(lm)
    (tmp_path / "corpus" / "bad.txt").write_bytes(b"fine\nstill fine\n\xff\n")
    lm = toy.config(tmp_path, format="lm", path=str(tmp_path / "corpus" / "bad.txt")).data
    with pytest.raises(DataError, match=r"bad\.txt:3: invalid UTF-8"):
        read_lm_text(lm)


# ------------------------------------------------------------------------------------- prepare


def test_prepare_filters_reports_and_round_trips(tmp_path, capsys, toy):
    pairs = toy.pairs(200)
    pairs[5] = ("", "an empty source")
    pairs[9] = ("ein leeres ziel", "")
    pairs[20] = (" ".join(["katze"] * 100), "cat")  # >= 100 pieces
    pairs[30] = ("katze", " ".join(["green"] * 100))
    toy.write(tmp_path / "corpus", "train", pairs)
    toy.write(tmp_path / "corpus", "val", toy.pairs(20, seed=1))
    config = toy.config(tmp_path, max_source_len=80, max_target_len=80)
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


def test_prepare_is_idempotent_and_redoes_changed_settings(tmp_path, capsys, toy):
    toy.write(tmp_path / "corpus", "train", toy.pairs(100))
    toy.write(tmp_path / "corpus", "val", toy.pairs(10, seed=1))
    toy.write(tmp_path / "corpus", "test", toy.pairs(10, seed=2))
    out = prepare(toy.config(tmp_path))
    stamp = (out / "train.src.bin").stat().st_mtime_ns
    capsys.readouterr()
    assert (
        prepare(toy.config(tmp_path, prepare={"num_workers": 2}, batch={"max_tokens": 99})) == out
    )
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "train.src.bin").stat().st_mtime_ns == stamp
    prepare(toy.config(tmp_path), splits=["test"])  # a new split only
    assert (out / "train.src.bin").stat().st_mtime_ns == stamp
    assert len(TokenizedCorpus(out, "test")) == 10
    prepare(toy.config(tmp_path, vocab_size=50))
    assert "data settings changed (vocab_size)" in capsys.readouterr().out
    assert (out / "train.src.bin").stat().st_mtime_ns != stamp
    assert Tokenizer.load(out / "tokenizer").src_vocab_size == 50
    with pytest.raises(DataError, match="'test' is not prepared"):
        TokenizedCorpus(out, "test")  # the old test split went with the old tokenizer


def test_worker_processes_give_the_same_ids(tmp_path, toy):
    toy.write(tmp_path / "corpus", "train", toy.pairs(5000))
    toy.write(tmp_path / "corpus", "val", toy.pairs(10, seed=1))
    one = prepare(toy.config(tmp_path, prepare={"out_dir": str(tmp_path / "one")}))
    two = prepare(
        toy.config(tmp_path, prepare={"out_dir": str(tmp_path / "two"), "num_workers": 2})
    )
    for name in ("train.src.bin", "train.src.idx", "train.tgt.bin", "train.tgt.idx"):
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_prepare_on_a_multi30k_slice(tmp_path, shared_data, toy):
    for split, n in (("train", 2000), ("val", 200)):
        for lang in ("de", "en"):
            with gzip.open(shared_data / "multi30k" / f"{split}.{lang}.gz", "rt") as file:
                lines = list(itertools.islice(file, n))
            (tmp_path / "corpus").mkdir(exist_ok=True)
            (tmp_path / "corpus" / f"{split}.{lang}").write_text("".join(lines), encoding="utf-8")
    out = prepare(toy.config(tmp_path, prepare={"num_workers": 2}, vocab_size=1000))
    corpus = TokenizedCorpus(out, "train")
    assert 1990 <= len(corpus) <= 2000
    tokenizer = Tokenizer.load(out / "tokenizer")
    first_de = (tmp_path / "corpus" / "train.de").read_text(encoding="utf-8").splitlines()[0]
    assert tokenizer.decode_source(corpus.source(0)) == first_de
    # subword units: far fewer pieces than characters, more than words
    mean = corpus.src_lengths.mean()
    assert 10 < mean < 40


# ----------------------------------------------------------------------------------------- CLI


def test_cli_prepares_and_reports_errors(tmp_path, capsys, toy):
    toy.write(tmp_path / "corpus", "train", toy.pairs(50))
    toy.write(tmp_path / "corpus", "val", toy.pairs(5, seed=1))
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


# ------------------------------------------------------------------ fingerprints by section


def test_batching_changes_never_prepare_again_but_data_changes_do(tmp_path, capsys, toy):
    toy.write(tmp_path / "corpus", "train", toy.pairs(100))
    toy.write(tmp_path / "corpus", "val", toy.pairs(10, seed=1))
    out = prepare(toy.config(tmp_path))
    stamp = (out / "train.src.bin").stat().st_mtime_ns
    capsys.readouterr()
    batching = {"max_tokens": 123, "block_size": 7, "batch_size": 3, "eval_batches": 2}
    prepare(toy.config(tmp_path, prepare={"num_workers": 2}, batch=batching))
    assert "nothing to do" in capsys.readouterr().out
    assert (out / "train.src.bin").stat().st_mtime_ns == stamp
    prepare(toy.config(tmp_path, tokenizer="char"))
    assert "data settings changed (tokenizer)" in capsys.readouterr().out
    assert Tokenizer.load(out / "tokenizer").kind == "char"
    prepare(toy.config(tmp_path, tokenizer="char", max_source_len=30))
    assert "data settings changed (max_source_len)" in capsys.readouterr().out
    assert TokenizedCorpus(out, "train").src_lengths.max() <= 30


def test_old_layout_keys_name_their_new_section(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.max_tokens: moved to batch\.max_tokens"):
        config_from_dict({"data": {"max_tokens": 10}})
    old = {"format_version": 1, "data": {"max_tokens": 10, "prepared_dir": "p", "vocab_size": 9}}
    migrated = config_from_dict(old)  # a checkpoint saved before the split still loads
    assert (migrated.batch.max_tokens, migrated.prepare.out_dir) == (10, "p")
    assert migrated.data.vocab_size == 9


# ------------------------------------------------------------------ single process, workers


def test_single_process_encoding_never_reloads_the_tokenizer(tmp_path, monkeypatch, toy):
    toy.write(tmp_path / "corpus", "train", toy.pairs(50))
    toy.write(tmp_path / "corpus", "val", toy.pairs(5, seed=1))
    loads = []
    real_load = Tokenizer.load.__func__
    monkeypatch.setattr(
        Tokenizer, "load", classmethod(lambda c, d: loads.append(d) or real_load(c, d))
    )
    out = prepare(toy.config(tmp_path))
    assert loads == []  # the freshly trained tokenizer encodes both splits
    toy.write(tmp_path / "corpus", "test", toy.pairs(5, seed=2))
    prepare(toy.config(tmp_path), splits=["test"])
    assert loads == [out / "tokenizer"]  # a new split: loaded once from disk


def _killed_worker(chunk, tokenizer=None, alpha=0.0, seed=0):  # in a worker, as the OOM killer
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture
def alarm():
    """Fail instead of hanging for ever: SIGALRM after 60 s raises in the main thread."""

    def timeout(*_):
        raise TimeoutError("prepare hung after its worker died")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_killed_worker_is_a_clear_error_not_a_hang(tmp_path, monkeypatch, capsys, toy, alarm):
    toy.write(tmp_path / "corpus", "train", toy.pairs(50))
    toy.write(tmp_path / "corpus", "val", toy.pairs(5, seed=1))
    monkeypatch.setattr(prepare_module, "_encode_pairs", _killed_worker)
    config = toy.config(tmp_path, prepare={"num_workers": 2})
    with pytest.raises(DataError, match=r"worker process died while encoding 'train'.*num_workers"):
        prepare(config)
    assert not (config.prepared_dir() / "manifest.json").exists()


# ------------------------------------------------------------------ failed writes


class _FullDisk(io.FileIO):
    def write(self, payload):
        super().write(bytes(payload)[:10])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_no_temporary_files_and_one_error_line(
    tmp_path, monkeypatch, capsys, toy
):
    toy.write(tmp_path / "corpus", "train", toy.pairs(60))
    toy.write(tmp_path / "corpus", "val", toy.pairs(5, seed=1))
    real_open = io.open

    def open_on_a_full_disk(file, mode="r", *args, **kwargs):
        if "w" in mode and ".tmp-" in str(file) and "train.tgt.bin" in str(file):
            return _FullDisk(file, "w")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", open_on_a_full_disk)
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  path: {tmp_path / 'corpus'}\n  vocab_size: 50\n")
    overrides = [f"train.out_dir={tmp_path / 'run'}", "prepare.num_workers=1"]
    assert main([str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seq2seq prepare: error: ") and "Traceback" not in err
    assert "train.tgt.bin: No space left on device" in err
    prepared = tmp_path / "run" / "data"
    assert not list(prepared.glob("*.tmp-*"))
    assert not (prepared / "manifest.json").exists()
    monkeypatch.setattr(io, "open", real_open)
    assert main([str(config), *overrides]) == 0  # and the next try starts again cleanly


def test_leftovers_of_a_killed_prepare_are_removed(tmp_path, toy):
    toy.write(tmp_path / "corpus", "train", toy.pairs(30))
    toy.write(tmp_path / "corpus", "val", toy.pairs(5, seed=1))
    config = toy.config(tmp_path)
    config.prepared_dir().mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = config.prepared_dir() / f"train.src.bin.tmp-{dead.pid}"
    stale.write_bytes(b"half a file")
    prepare(config)
    assert not stale.exists()


# ------------------------------------------------------------------ checksums


def test_manifest_records_size_and_sha256_of_every_file(tmp_path, toy):
    toy.write(tmp_path / "corpus", "train", toy.pairs(30))
    toy.write(tmp_path / "corpus", "val", toy.pairs(5, seed=1))
    out = prepare(toy.config(tmp_path))
    manifest = json.loads((out / "manifest.json").read_text())
    for split in ("train", "val"):
        files = manifest["splits"][split]["files"]
        assert sorted(files) == sorted(
            f"{split}.{s}.{e}" for s in ("src", "tgt") for e in ("bin", "idx")
        )
        for name, entry in files.items():
            payload = (out / name).read_bytes()
            assert entry == {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


# ---------------------------------------------------------------------- subword regularization


def test_subword_sampling_writes_seeded_segmentations_of_the_same_text(tmp_path, capsys, toy):
    pairs = toy.pairs(300)
    toy.write(tmp_path / "corpus", "train", pairs)
    toy.write(tmp_path / "corpus", "val", toy.pairs(20, seed=1))
    sampling = dict(subword_alpha=0.1, subword_samples=3)
    out = prepare(toy.config(tmp_path, prepare={"num_workers": 1}, **sampling))
    tokenizer = Tokenizer.load(out / "tokenizer")
    plain = TokenizedCorpus(out, "train")
    samples = [TokenizedCorpus(out, f"train.sample{k}") for k in (1, 2, 3)]
    for corpus in samples:
        assert len(corpus) == len(plain) == len(pairs)
        for i in range(0, len(pairs), 7):  # another segmentation of the same text
            assert tokenizer.decode_source(corpus.source(i)) == pairs[i][0]
            assert tokenizer.decode_target(corpus.target(i)) == pairs[i][1]
        for lengths, base in (
            (corpus.src_lengths, plain.src_lengths),
            (corpus.tgt_lengths, plain.tgt_lengths),
        ):
            assert (lengths >= base).all() and lengths.sum() > base.sum()  # merges skipped
    differing = [
        not np.array_equal(samples[0].target(i), samples[1].target(i)) for i in range(len(pairs))
    ]
    assert 0 < sum(differing) < len(pairs)
    assert TokenizedCorpus(out, "val").src_lengths.sum() < samples[0].src_lengths.sum()
    # Seeded per chunk: two worker processes write the same files as one.
    other = toy.config(
        tmp_path, prepare={"out_dir": str(tmp_path / "other"), "num_workers": 2}, **sampling
    )
    prepare(other)
    files = [
        json.loads((d / "manifest.json").read_text())["splits"] for d in (out, other.prepared_dir())
    ]
    assert files[0]["train.sample2"]["files"] == files[1]["train.sample2"]["files"]
    capsys.readouterr()
    prepare(toy.config(tmp_path, prepare={"num_workers": 1}, subword_alpha=0.1, subword_samples=4))
    assert "data settings changed (subword_samples)" in capsys.readouterr().out
    assert len(TokenizedCorpus(out, "train.sample4")) == len(pairs)


def test_without_sampling_the_fingerprint_is_as_before_the_option(tmp_path, toy):
    """A directory prepared before subword sampling existed is not prepared again."""
    data = toy.config(tmp_path).data
    assert "subword_alpha" not in data_fingerprint(data)
    assert data_fingerprint(data) == data_fingerprint(toy.config(tmp_path, subword_samples=2).data)
    assert data.sampled_splits() == []
    sampled = toy.config(tmp_path, subword_alpha=0.1).data
    assert data_fingerprint(sampled)["subword_alpha"] == 0.1
    assert sampled.sampled_splits() == [f"train.sample{k}" for k in range(1, 9)]
