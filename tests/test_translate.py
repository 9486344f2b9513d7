"""translate: one output line per input line, in order, whatever the input; batching invisible."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seq2seq.checkpoint import load_model, save_checkpoint
from seq2seq.config import DecodeConfig, ModelConfig, RunConfig, replace
from seq2seq.model import build_model
from seq2seq.tokenizer import CharVocab, Tokenizer
from seq2seq.translate import (
    clean_line,
    main,
    token_batches,
    translate_lines,
    translate_nbest,
)

MAX_POSITIONS = 24
CHARS = "abcdefghijklmnopqrstuvwxyz .,!?\n\r"
LINES = [
    "hello world",
    "",
    "   ",
    "the quick brown fox " * 3,  # 60 characters: longer than max_positions, so truncated
    "ab",
    "Привет, мир! 你好 ok",  # mixed scripts: unknown characters become UNK
    "\t",
    "a, b. c!",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model_config = ModelConfig(
        d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1, n_decoder_layers=2, dropout=0.0,
        max_positions=MAX_POSITIONS,
    )  # fmt: skip
    config = RunConfig(model=model_config)
    config = replace(
        config,
        data={"tokenizer": "char"},
        decode={"beam_size": 3, "min_len": 2, "max_len_a": 1.0, "max_len_b": 4, "nbest": 1},
    )
    tokenizer = Tokenizer("char", CharVocab(CHARS))
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    return save_checkpoint(tmp_path_factory.mktemp("models") / "tiny", model, config, tokenizer)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir)


def write_input(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_batched_equals_one_by_one_and_empty_lines_stay_empty(loaded, capsys):
    model, tokenizer, config = loaded
    batched = list(translate_lines(model, tokenizer, LINES, config.decode))
    assert len(batched) == len(LINES)
    for line, got in zip(LINES, batched):
        alone = list(translate_lines(model, tokenizer, [line], config.decode))
        assert alone == [got]
        assert (got == "") == (line.strip() == "")
        assert "\n" not in got and "\r" not in got
    # Non-empty translations differ between inputs, so order is really checked.
    assert len({batched[i] for i in (0, 3, 4, 5, 7)}) > 2
    # Tiny token budgets (one sentence per batch) and tiny chunks give the same answers.
    small = dataclasses.replace(config.decode, batch_tokens=1)
    assert list(translate_lines(model, tokenizer, LINES, small)) == batched
    chunked = translate_nbest(model, tokenizer, LINES, config.decode, chunk_size=3)
    assert [n[0][0] if n else "" for n in chunked] == batched
    assert capsys.readouterr().err.count("1 input line(s) longer than") >= 1


def test_greedy_path_and_nbest_are_consistent(loaded):
    model, tokenizer, config = loaded
    decode = dataclasses.replace(config.decode, beam_size=4, nbest=4)
    nbest = list(translate_nbest(model, tokenizer, LINES, decode))
    best = list(translate_lines(model, tokenizer, LINES, decode))
    for line, hyps, top in zip(LINES, nbest, best):
        if not line.strip():
            assert hyps == []
            continue
        assert hyps[0][0] == top and len(hyps) == 4
        scores = [score for _, score in hyps]
        assert scores == sorted(scores, reverse=True)
    greedy = dataclasses.replace(config.decode, beam_size=1)
    beam_one = list(translate_lines(model, tokenizer, LINES, greedy))
    assert len(beam_one) == len(LINES) and beam_one[1] == ""


def test_cli_files_truncation_warning_and_nbest(model_dir, tmp_path, capsys):
    source = write_input(tmp_path / "in.txt", LINES)
    out = tmp_path / "out.txt"
    assert main(["--model", str(model_dir), "--input", str(source), "--output", str(out)]) == 0
    written = out.read_text(encoding="utf-8").split("\n")
    assert written[-1] == "" and len(written) - 1 == len(LINES)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "1 input line(s) longer than" in err
    assert "sentences/s" in err and "generated tokens/s" in err
    model, tokenizer, config = load_model(model_dir)
    assert written[:-1] == list(translate_lines(model, tokenizer, LINES, config.decode))

    argv = ["--model", str(model_dir), "--input", str(source), "--output", str(out)]
    assert main(argv + ["--nbest", "2", "--beam", "2", "--lenpen", "1.0"]) == 0
    rows = [row.split(" ||| ") for row in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 * len(LINES)
    assert [int(r[0]) for r in rows] == [i for i in range(len(LINES)) for _ in range(2)]
    assert rows[2] == ["1", "", "0.0000"]  # the empty line
    assert float(rows[0][2]) >= float(rows[1][2])

    # Length flags reach the search: one character per token, max_len counts EOS.
    assert main(argv + ["--max-len-a", "0", "--max-len-b", "4", "--min-len", "3"]) == 0
    lengths = [len(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [n for n, line in zip(lengths, LINES) if line.strip()] == [3] * 5


def test_invalid_utf8_names_the_line_unless_replaced(model_dir, tmp_path, capsys):
    source = tmp_path / "bad.txt"
    source.write_bytes(b"hello\n\nbad \xff\xfe byte\nok\r\nlast without newline")
    out = tmp_path / "out.txt"
    argv = ["--model", str(model_dir), "--input", str(source), "--output", str(out)]
    assert main(argv) == 2  # a user error, as in every seq2seq command
    assert "bad.txt:3: invalid UTF-8" in capsys.readouterr().err
    assert main(argv + ["--replace-invalid"]) == 0
    written = out.read_text(encoding="utf-8").split("\n")
    assert len(written) == 6 and written[1] == "" and written[-1] == ""
    missing = ["--model", str(model_dir), "--input", str(tmp_path / "nope.txt")]
    assert main(missing) == 2
    assert "nope.txt: No such file" in capsys.readouterr().err


def test_cli_user_errors_exit_2_and_name_the_problem(model_dir, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("ab\n")
    argv = ["--model", str(model_dir), "--input", str(source), "--device", "cpu"]
    assert main(argv + ["--beam", "2", "--nbest", "3"]) == 2
    assert "seq2seq translate: error: --nbest 3 exceeds --beam 2" in capsys.readouterr().err
    assert main(argv + ["--beam", "2", "--nbest", "2", "--output", str(tmp_path / "o")]) == 0
    assert len((tmp_path / "o").read_text().splitlines()) == 2

    gpt_config = replace(
        RunConfig(model=ModelConfig(arch="gpt", d_model=16, n_heads=2, d_ff=16,
                                    n_encoder_layers=0, n_decoder_layers=1)),
        data={"format": "lm", "tokenizer": "char"},
    )  # fmt: skip
    tokenizer = Tokenizer("char", CharVocab(CHARS))
    gpt = build_model(gpt_config.model, tokenizer.vocab_size, tokenizer.vocab_size)
    gpt_dir = save_checkpoint(tmp_path / "gpt", gpt, gpt_config, tokenizer)
    assert main(["--model", str(gpt_dir), "--input", str(source)]) == 2
    assert "a GPT model cannot translate" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nowhere"), "--input", str(source)]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_cli_stdin_stdout_subprocess_and_bf16(model_dir):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    text = "\n".join(LINES[:3] + ["x"]) + "\n"
    command = [sys.executable, "-m", "seq2seq", "translate", "--model", str(model_dir)]
    result = subprocess.run(
        command + ["--bf16", "--device", "cpu", "--beam", "1"],
        input=text.encode(), capture_output=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode("utf-8").split("\n")
    assert len(lines) == 5 and lines[1] == lines[2] == lines[4] == "" and lines[0] and lines[3]
    assert b"sentences/s" in result.stderr


def test_token_batches_and_clean_line():
    lengths = [5, 1, 9, 3, 3, 7]
    batches = token_batches(lengths, batch_tokens=12)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 12
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    assert token_batches(lengths, batch_tokens=1) == [[2], [5], [0], [3], [4], [1]]
    assert clean_line("a\nb\r\nc\u2028d") == "a b  c d"
    assert DecodeConfig().beam_size == 4  # defaults come from the config, not from this module


def test_out_of_memory_halves_the_batch_and_loses_nothing(loaded, monkeypatch, capsys):
    import seq2seq.decoding as translate_module  # the batched decode core

    model, tokenizer, config = loaded
    expected = list(translate_lines(model, tokenizer, LINES, config.decode))
    real = translate_module.translate_ids
    sizes = []

    def fails_above_two(model, sources, *args):
        sizes.append(len(sources))
        if len(sources) > 2:
            raise torch.OutOfMemoryError("scripted: batch too large")
        return real(model, sources, *args)

    monkeypatch.setattr(translate_module, "translate_ids", fails_above_two)
    assert list(translate_lines(model, tokenizer, LINES, config.decode)) == expected
    assert max(sizes) > 2 and "out of memory on a batch" in capsys.readouterr().err

    def always_fails(model, sources, *args):
        raise torch.OutOfMemoryError("scripted: nothing fits")

    monkeypatch.setattr(translate_module, "translate_ids", always_fails)
    with pytest.raises(torch.OutOfMemoryError):
        list(translate_lines(model, tokenizer, LINES, config.decode))
