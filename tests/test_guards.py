"""Issue 12, the inference and output half: outputs never destroy inputs or existing directories,
model directories are verified whole and never follow symlinks, corrupt files and bad options
give one clear line (exit 2), and a full disk is named as such."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seq2seq import average, checkpoint
from seq2seq.checkpoint import (
    TRAINER_STATE_KEYS,
    CheckpointError,
    load_for_inference,
    load_model,
    load_trainer_state,
    save_checkpoint,
    save_training_checkpoint,
    step_dirs,
    verify_checksums,
)
from seq2seq.config import ConfigError, config_from_dict
from seq2seq.directory import regular_files, sha256_file
from seq2seq.evaluate import main as evaluate_main
from seq2seq.export import main as export_main
from seq2seq.model import build_model
from seq2seq.sample import main as sample_main
from seq2seq.tokenizer import CharVocab, Tokenizer, TokenizerError
from seq2seq.translate import main as translate_main
from seq2seq.translate import translate_lines

CHARS = "abcdefgh "
TINY = dict(d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=1, dropout=0.0)


def _transformer_dir(root: Path) -> Path:
    tokenizer = Tokenizer("char", CharVocab(CHARS))
    config = config_from_dict(
        {
            "model": dict(TINY, max_positions=24),
            "data": {"tokenizer": "char"},
            "decode": {"beam_size": 2, "max_len_a": 1.0, "max_len_b": 3, "batch_tokens": 256},
        }
    )
    torch.manual_seed(1)
    model = build_model(config.model, tokenizer.vocab_size, tokenizer.vocab_size)
    return save_checkpoint(root, model, config, tokenizer)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny encoder-decoder model directory; tests that change files work on a copy."""
    return _transformer_dir(tmp_path_factory.mktemp("guards") / "model")


@pytest.fixture(scope="module")
def gpt_dir(tmp_path_factory) -> Path:
    tokenizer = Tokenizer("char", CharVocab(CHARS + "\n"))
    config = config_from_dict(
        {
            "model": dict(TINY, arch="gpt", n_encoder_layers=0, max_positions=16),
            "data": {"format": "lm", "tokenizer": "char"},
            "decode": {"max_new_tokens": 4},
        }
    )
    torch.manual_seed(2)
    model = build_model(config.model, tokenizer.vocab_size, tokenizer.vocab_size)
    return save_checkpoint(tmp_path_factory.mktemp("guards") / "gpt", model, config, tokenizer)


@pytest.fixture
def run_dir(model_dir, tmp_path) -> Path:
    """A run directory with step_1 and step_2 training checkpoints and a prepared-data file."""
    model, tokenizer, config = load_model(model_dir)
    run = tmp_path / "run"
    for step in (1, 2):
        with torch.no_grad():  # each step's weights differ, so that averages differ
            next(model.parameters()).add_(0.5)
        save_training_checkpoint(run, step, model, config, tokenizer, {"counters": {"step": step}})
    (run / "data").mkdir()
    (run / "data" / "train.bin").write_bytes(b"prepared")
    return run


def _snapshot(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (what must survive a refusal)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _regenerate_checksums(directory: Path) -> None:
    """What an attacker (or a careless script) who edits a file can do: list it afresh."""
    names = regular_files(directory)
    sums = {name: sha256_file(directory / name) for name in names}
    (directory / "checksums.json").write_text(json.dumps(sums))


def _one_error_line(err: str, command: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith(f"seq2seq {command}: error: "), err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, err)
    return lines[-1]


# ------------------------------------------------------------ 1. average and export outputs


@pytest.mark.parametrize("where", ["run dir", "input checkpoint", "cwd", "a file", "inside input"])
def test_average_refuses_an_out_that_exists_or_is_inside_an_input(
    run_dir, tmp_path, capsys, monkeypatch, where
):
    step_1, step_2 = step_dirs(run_dir)
    out = {
        "run dir": run_dir,
        "input checkpoint": step_1,
        "cwd": Path("."),
        "a file": run_dir / "data" / "train.bin",
        "inside input": step_2 / "avg",
    }[where]
    monkeypatch.chdir(run_dir)
    before = _snapshot(run_dir)
    code = average.main(["--out", str(out), str(step_1), str(step_2)])
    assert code == 2
    _one_error_line(capsys.readouterr().err, "average", str(out))
    assert _snapshot(run_dir) == before  # nothing deleted, nothing added
    assert not [p for p in run_dir.rglob("*") if ".old-" in p.name or ".tmp-" in p.name]
    verify_checksums(step_1)


def test_average_writes_beside_and_renames_only_when_complete(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "avg"

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(average, "save_file", full_disk)
    with pytest.raises(CheckpointError, match=r"avg\.tmp-.*model\.safetensors.*ENOSPC"):
        average.average_checkpoints(step_dirs(run_dir), out)
    assert not out.exists() and not list(tmp_path.glob("avg.tmp-*"))
    monkeypatch.undo()
    assert average.main(["--out", str(out), "--last", "2", str(run_dir)]) == 0
    load_model(out)


def test_average_replace_swaps_only_an_earlier_average(run_dir, tmp_path, capsys):
    step_1, step_2 = step_dirs(run_dir)
    out = run_dir / "model"
    assert average.main(["--out", str(out), str(step_1)]) == 0
    first = load_file(str(out / "model.safetensors"))
    assert average.main(["--out", str(out), str(step_1), str(step_2)]) == 2  # no --replace
    capsys.readouterr()
    assert average.main(["--replace", "--out", str(out), str(step_1), str(step_2)]) == 0
    second = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    load_model(out)
    before = _snapshot(run_dir)
    for target in (run_dir, step_1, run_dir / "data"):
        assert average.main(["--replace", "--out", str(target), str(step_2)]) == 2
        _one_error_line(capsys.readouterr().err, "average", str(target), "--replace refused")
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("where", ["the model", "inside the model", "existing empty dir"])
def test_export_never_overwrites_or_writes_into_an_input(model_dir, tmp_path, capsys, where):
    pytest.importorskip("transformers")
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    (tmp_path / "empty").mkdir()
    out = {
        "the model": model,
        "inside the model": model / "hf",
        "existing empty dir": tmp_path / "empty",
    }[where]
    before = _snapshot(tmp_path)
    assert export_main(["--model", str(model), "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, "export", str(out))
    assert _snapshot(tmp_path) == before
    load_model(model)


# ------------------------------------------------------------ 2. translate --output


@pytest.mark.parametrize("alias", ["same path", "symlink", "hard link"])
def test_translate_refuses_an_output_that_is_the_input(model_dir, tmp_path, capsys, alias):
    source = tmp_path / "in.txt"
    source.write_text("abc\ndef\n")
    output = {"same path": source, "symlink": tmp_path / "link", "hard link": tmp_path / "hard"}[
        alias
    ]
    if alias == "symlink":
        output.symlink_to(source)
    elif alias == "hard link":
        os.link(source, output)
    argv = ["--model", str(model_dir), "--device", "cpu", "--input", str(source)]
    assert translate_main([*argv, "--output", str(output)]) == 2
    _one_error_line(capsys.readouterr().err, "translate", str(output), "is the input")
    assert source.read_text() == "abc\ndef\n"


def test_translate_output_is_whole_or_untouched(model_dir, tmp_path, capsys):
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    output.write_text("previous translation\n")
    source.write_bytes(b"abc\ndef\nbad \xff byte\n" + b"gh\n" * 20)
    argv = ["--model", str(model_dir), "--device", "cpu", "--input", str(source)]
    assert translate_main([*argv, "--output", str(output)]) == 2  # fails at line 3
    assert "in.txt:3: invalid UTF-8" in capsys.readouterr().err
    assert output.read_text() == "previous translation\n"  # not truncated, not half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]  # no temp left
    old_mask = os.umask(0o022)
    try:
        assert translate_main([*argv, "--output", str(output), "--replace-invalid"]) == 0
    finally:
        os.umask(old_mask)
    assert len(output.read_text().splitlines()) == 23
    assert output.stat().st_mode & 0o777 == 0o644  # the umask's mode, not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


# ------------------------------------------------------------ 3. checksums cover every file


@pytest.mark.parametrize("listing", ["{}", "[]", '"x"', '{"config.yaml": 5}'])
def test_an_empty_or_malformed_checksum_listing_is_an_error(model_dir, tmp_path, listing):
    directory = shutil.copytree(model_dir, tmp_path / "m")
    (directory / "checksums.json").write_text(listing)
    with pytest.raises(CheckpointError, match=r"checksums\.json: malformed"):
        load_model(directory)


def test_an_unlisted_file_is_named(model_dir, tmp_path):
    directory = shutil.copytree(model_dir, tmp_path / "m")
    (directory / "tokenizer" / "extra.bin").write_bytes(b"unverified")
    with pytest.raises(CheckpointError, match=r"tokenizer/extra\.bin: file not listed"):
        load_model(directory)


def test_a_symlink_inside_a_model_directory_is_refused(model_dir, tmp_path, capsys):
    directory = shutil.copytree(model_dir, tmp_path / "m")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside file\n")
    link = directory / "tokenizer" / "notes.txt"
    link.symlink_to(secret)
    _regenerate_checksums_following_links = {
        **json.loads((directory / "checksums.json").read_text()),
        "tokenizer/notes.txt": hashlib.sha256(secret.read_bytes()).hexdigest(),
    }
    (directory / "checksums.json").write_text(json.dumps(_regenerate_checksums_following_links))
    with pytest.raises(CheckpointError, match=re.escape(str(link)) + ": symlink"):
        load_model(directory)
    out = tmp_path / "avg"
    assert average.main(["--out", str(out), str(directory)]) == 2
    _one_error_line(capsys.readouterr().err, "average", str(link), "symlink")
    assert not out.exists()


# ------------------------------------------------------------ 4. file modes follow the umask


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_checkpoint_files_follow_the_umask(model_dir, tmp_path, mask, mode):
    model, tokenizer, config = load_model(model_dir)
    old = os.umask(mask)
    try:
        directory = save_checkpoint(tmp_path / "m", model, config, tokenizer, {"step": 1})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in directory.rglob("*") if p.is_file()}
    assert modes["model.safetensors"] == mode, modes
    assert set(modes.values()) == {mode}, modes
    assert directory.stat().st_mode & 0o777 == 0o777 & ~mask


# ------------------------------------------------------------ 5. corrupt files, fresh checksums


def _flip_header_bit(directory: Path) -> Path:
    path = directory / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8] ^= 0x01  # the first byte of the JSON header: "{" becomes "z"
    path.write_bytes(bytes(data))
    return path


def _rewrite(directory: Path, name: str, text: str) -> Path:
    (directory / name).write_text(text)
    return directory / name


def _edit_json(directory: Path, name: str, edit) -> Path:
    path = directory / name
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return path


CORRUPTIONS = {
    "safetensors header": (_flip_header_bit, "cannot load weights"),
    "config is a list": (lambda d: _rewrite(d, "config.yaml", "- a\n- b\n"), "malformed config"),
    "config is a string": (lambda d: _rewrite(d, "config.yaml", "hello\n"), "malformed config"),
    "config format_version string": (
        lambda d: _rewrite(d, "config.yaml", "format_version: '1'\n"),
        "format_version must be an integer, got '1' (str)",
    ),
    "tokenizer.json is a list": (
        lambda d: _rewrite(d, "tokenizer/tokenizer.json", "[1, 2]"),
        "expected a JSON object",
    ),
    "tokenizer.json without joint": (
        lambda d: _edit_json(
            d, "tokenizer/tokenizer.json", lambda m: {k: v for k, v in m.items() if k != "joint"}
        ),
        "'joint' must be true or false",
    ),
    "tokenizer kind": (
        lambda d: _edit_json(d, "tokenizer/tokenizer.json", lambda m: {**m, "kind": "wordpiece"}),
        "unknown tokenizer kind 'wordpiece'",
    ),
    "tokenizer format_version newer": (
        lambda d: _edit_json(d, "tokenizer/tokenizer.json", lambda m: {**m, "format_version": 9}),
        "format_version 9 is newer",
    ),
    "tokenizer format_version string": (
        lambda d: _edit_json(d, "tokenizer/tokenizer.json", lambda m: {**m, "format_version": "1"}),
        "format_version must be an integer, got '1' (str)",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_files_behind_fresh_checksums_give_one_line(model_dir, tmp_path, capsys, case):
    directory = shutil.copytree(model_dir, tmp_path / "m")
    corrupt, expected = CORRUPTIONS[case]
    path = corrupt(directory)
    _regenerate_checksums(directory)
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + re.escape(expected)):
        load_model(directory)
    source = tmp_path / "in.txt"
    source.write_text("abc\n")
    argv = ["--model", str(directory), "--device", "cpu", "--input", str(source)]
    assert translate_main(argv) == 2
    _one_error_line(capsys.readouterr().err, "translate", str(path), expected)


def test_an_empty_sentencepiece_model_is_named(tmp_path):
    meta = {
        "format_version": 1, "kind": "bpe", "joint": True,
        "special_ids": {"pad": 0, "unk": 1, "bos": 2, "eos": 3},
        "source": {"vocab_size": 8, "model_file": "spm.model"},
        "target": {"vocab_size": 8, "model_file": "spm.model"},
    }  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(meta))
    (tmp_path / "spm.model").write_bytes(b"")
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / "spm.model")) + ": empty"):
        Tokenizer.load(tmp_path)
    (tmp_path / "spm.model").write_bytes(b"\x00not a model")
    with pytest.raises(TokenizerError, match=re.escape(str(tmp_path / "spm.model"))):
        Tokenizer.load(tmp_path)
    meta["source"]["model_file"] = "../../etc/passwd"
    (tmp_path / "tokenizer.json").write_text(json.dumps(meta))
    with pytest.raises(TokenizerError, match="model_file must name a file"):
        Tokenizer.load(tmp_path)


@pytest.mark.parametrize("payload", [[1, 2, 3], "state", {"counters": {"step": 1}}])
def test_a_malformed_trainer_state_is_named(tmp_path, payload):
    torch.save(payload, tmp_path / "trainer_state.pt")
    path = re.escape(str(tmp_path / "trainer_state.pt"))
    with pytest.raises(CheckpointError, match=path + ": malformed trainer state"):
        load_trainer_state(tmp_path, required=TRAINER_STATE_KEYS)
    (tmp_path / "trainer_state.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CheckpointError, match=path + ": cannot load trainer state"):
        load_trainer_state(tmp_path)


# ------------------------------------------------------------ 6. a full disk is named


@pytest.mark.parametrize("failure", ["oserror", "torch runtime error"])
def test_a_full_disk_during_a_checkpoint_write_names_enospc(
    model_dir, tmp_path, monkeypatch, failure
):
    model, tokenizer, config = load_model(model_dir)
    run = tmp_path / "run"
    first = save_training_checkpoint(run, 1, model, config, tokenizer, {"counters": {"step": 1}})

    def full_disk(*args, **kwargs):
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . unexpected pos 1216 vs 1114\n"
            "basic_ios::clear: iostream error"
        )

    monkeypatch.setattr(torch, "save", full_disk)
    if failure != "oserror":  # torch does not say why: the free space does
        monkeypatch.setattr(
            checkpoint.shutil,
            "disk_usage",
            lambda p: types.SimpleNamespace(total=1, used=1, free=0),
        )
    with pytest.raises(CheckpointError) as caught:
        save_training_checkpoint(run, 2, model, config, tokenizer, {"counters": {"step": 2}})
    message = str(caught.value)
    assert "trainer_state.pt" in message and str(run) in message
    assert "no space left on device" in message.lower() and "ENOSPC" in message
    assert "basic_ios" not in message
    assert isinstance(caught.value, OSError)  # still what it is, for callers that catch that
    monkeypatch.undo()
    assert step_dirs(run) == [first] and checkpoint.read_pointer(run, "last") == first
    load_model(first)


# ------------------------------------------------------------ 7. devices


BAD_DEVICES = ["foo", "cuda:5"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_an_absent_or_unknown_device_is_one_line(model_dir, gpt_dir, tmp_path, capsys, device):
    source = tmp_path / "in.txt"
    source.write_text("abc\n")
    assert (
        translate_main(["--model", str(model_dir), "--input", str(source), "--device", device]) == 2
    )
    _one_error_line(capsys.readouterr().err, "translate", "--device", repr(device))
    assert sample_main(["--model", str(gpt_dir), "--prompt", "ab", "--device", device]) == 2
    _one_error_line(capsys.readouterr().err, "sample", "--device", repr(device))
    argv = ["--model", str(model_dir), "--src", str(source), "--ref", str(source)]
    assert evaluate_main([*argv, "--device", device]) == 2
    _one_error_line(capsys.readouterr().err, "evaluate", "--device", repr(device))
    with pytest.raises(ConfigError, match=re.escape(repr(device))):
        load_for_inference(model_dir, device)
    with pytest.raises(ValueError, match=re.escape(repr(device))):
        load_model(model_dir, device)


# ------------------------------------------------------------ 8. translate options, broken pipe


@pytest.mark.parametrize(
    "flags, option",
    [
        (["--max-len-a", "inf"], "--max-len-a"),
        (["--max-len-a", "nan"], "--max-len-a"),
        (["--max-len-b", "-1"], "--max-len-b"),
        (["--lenpen", "nan"], "--lenpen"),
        (["--lenpen", "inf"], "--lenpen"),
        (["--beam", "0"], "--beam"),
        (["--batch-tokens", "0"], "--batch-tokens"),
    ],
)
def test_translate_rejects_bad_numbers_naming_the_option(
    model_dir, tmp_path, capsys, flags, option
):
    source, output = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("abc\n")
    argv = ["--model", str(model_dir), "--device", "cpu", "--input", str(source)]
    assert translate_main([*argv, "--output", str(output), *flags]) == 2
    _one_error_line(capsys.readouterr().err, "translate", f"{option} must be")
    assert not output.exists()


def test_translate_into_a_closed_pipe_exits_quietly(model_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("abc def\n" * 200)
    command = [sys.executable, "-m", "seq2seq", "translate", "--model", str(model_dir)]
    process = subprocess.Popen(
        [*command, "--device", "cpu", "--beam", "1", "--input", str(source)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    process.stdout.close()  # as `| head -0` does, before anything is written
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1, err  # the documented status for a closed stdout
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert "stdout closed early" in err


# ------------------------------------------------------------ 9. evaluate


def test_evaluate_nothing_to_score_and_bad_metric_lists(model_dir, tmp_path, capsys):
    empty, other, ref = tmp_path / "empty.hyp", tmp_path / "empty.ref", tmp_path / "ref"
    empty.write_text("")
    other.write_text("")
    ref.write_text("a b\nc d\n")
    assert evaluate_main(["--hyp", str(empty), "--ref", str(other)]) == 2
    _one_error_line(capsys.readouterr().err, "evaluate", "nothing to score", str(empty), str(other))
    assert evaluate_main(["--hyp", str(empty), "--ref", str(ref)]) == 2
    _one_error_line(capsys.readouterr().err, "evaluate", "line counts differ", str(empty), str(ref))
    for metrics, problem in ((",", "no metric given"), ("bleu,blue", "unknown metric 'blue'")):
        assert evaluate_main(["--hyp", str(ref), "--ref", str(ref), "--metrics", metrics]) == 2
        _one_error_line(capsys.readouterr().err, "evaluate", "--metrics", problem)
    argv = ["--model", str(model_dir), "--device", "cpu", "--src", str(empty), "--ref", str(other)]
    assert evaluate_main(argv) == 2
    _one_error_line(capsys.readouterr().err, "evaluate", "nothing to score", str(empty))


# ------------------------------------------------------------ 10. sample options and stdin


@pytest.mark.parametrize(
    "flags, option",
    [
        (["--temperature", "nan"], "--temperature"),
        (["--temperature", "inf"], "--temperature"),
        (["--temperature", "-0.5"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-p", "nan"], "--top-p"),
        (["--top-k", "-1"], "--top-k"),
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
    ],
)
def test_sample_rejects_bad_numbers_naming_the_option(gpt_dir, capsys, flags, option):
    argv = ["--model", str(gpt_dir), "--device", "cpu", "--prompt", "ab", *flags]
    assert sample_main(argv) == 2
    _one_error_line(capsys.readouterr().err, "sample", f"{option} must be")


def test_sample_and_translate_share_one_rule_for_invalid_utf8(gpt_dir, capsys, monkeypatch):
    def stdin(payload: bytes):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(payload), encoding="utf-8"))

    argv = ["--model", str(gpt_dir), "--device", "cpu", "--seed", "1"]
    stdin(b"ab\nc\xffd")
    assert sample_main(argv) == 2
    _one_error_line(capsys.readouterr().err, "sample", "<stdin>:2: invalid UTF-8 at byte 1")
    stdin(b"ab\nc\xffd")
    assert sample_main([*argv, "--replace-invalid"]) == 0
    assert capsys.readouterr().out.startswith("ab\nc")  # U+FFFD is not in this vocabulary


# ------------------------------------------------------------ 11. --precision


def test_precision_flag_and_the_deprecated_bf16_alias(model_dir, gpt_dir, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("abc\nfed cab\n")
    argv = ["--model", str(model_dir), "--device", "cpu", "--input", str(source)]
    outputs = {}
    for flags in (
        ["--precision", "fp32"],
        ["--precision", "auto"],
        ["--precision", "bf16"],
        ["--bf16"],
    ):
        output = tmp_path / ("_".join(flags) + ".out")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bf16 on a CPU without native bf16 warns: slow
            assert translate_main([*argv, "--output", str(output), *flags]) == 0
        err = capsys.readouterr().err
        outputs[flags[-1]] = output.read_text()
        expected = {"fp32": "precision: fp32", "auto": "precision: auto -> "}.get(
            flags[-1], "precision: bf16"
        )
        assert f"translate: {expected}" in err, err
    assert outputs["--bf16"] == outputs["bf16"]
    assert translate_main([*argv, "--bf16", "--precision", "fp32"]) == 2
    _one_error_line(capsys.readouterr().err, "translate", "--bf16 contradicts --precision fp32")
    assert sample_main(["--model", str(gpt_dir), "--prompt", "ab", "--precision", "fp32"]) == 0
    assert "sample: precision: fp32" in capsys.readouterr().err

    model, tokenizer, config = load_model(model_dir)
    lines = ["abc", "", "fed cab"]
    by_dtype = list(translate_lines(model, tokenizer, lines, config.decode, dtype=torch.bfloat16))
    assert by_dtype == list(translate_lines(model, tokenizer, lines, config.decode, bf16=True))
