"""translate's command line as a user meets it: an interactive dialogue over stdin, sampling,
and progress only on a terminal."""

from __future__ import annotations

import io
import os
import queue
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from seq2seq.checkpoint import save_checkpoint
from seq2seq.config import ModelConfig, RunConfig, replace
from seq2seq.model import build_model
from seq2seq.tokenizer import CharVocab, Tokenizer

CHARS = "abcdefghijklmnopqrstuvwxyz .,!?"
ROOT = Path(__file__).resolve().parents[1]
ANSWER_SECONDS = 10  # a tiny model answers in milliseconds; this only absorbs a busy machine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model_config = ModelConfig(
        d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1, n_decoder_layers=1, dropout=0.0,
        max_positions=32,
    )  # fmt: skip
    config = replace(
        RunConfig(model=model_config),
        data={"tokenizer": "char"},
        decode={"beam_size": 2, "max_len_a": 1.0, "max_len_b": 4},
    )
    tokenizer = Tokenizer("char", CharVocab(CHARS))
    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    return save_checkpoint(tmp_path_factory.mktemp("models") / "tiny", model, config, tokenizer)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _reader(stream) -> queue.Queue:
    """Lines of ``stream`` as they arrive, on a queue (None at end of stream)."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in iter(stream.readline, b""):
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_stdin_is_answered_line_by_line_while_it_stays_open(model_dir):
    process = subprocess.Popen(
        [sys.executable, "-m", "seq2seq.translate", "--model", str(model_dir), "--device", "cpu"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(),
    )  # fmt: skip
    try:
        stdout, stderr = _reader(process.stdout), _reader(process.stderr)
        # Wait until the model is loaded (the precision line comes last), so the clock below
        # times the answer, not Python's and torch's start-up.
        for line in iter(lambda: stderr.get(timeout=120), None):
            if b"precision" in line:
                break
        answers = []
        for text in (b"hello world\n", b"\n", b"a b c\n"):
            process.stdin.write(text)
            process.stdin.flush()
            start = time.monotonic()
            answers.append(stdout.get(timeout=ANSWER_SECONDS))
            assert time.monotonic() - start < ANSWER_SECONDS
        assert process.poll() is None  # still waiting for more input
        assert answers[1] == b"\n"  # an empty line gives an empty line
        assert all(answer.endswith(b"\n") and answer.count(b"\n") == 1 for answer in answers)
        process.stdin.close()
        assert stdout.get(timeout=30) is None  # nothing more than one line per line
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
        process.wait()


SOURCES = ["hello world", "", "the quick brown fox", "a b c", "ab ab ab ab", "zzz"]


def _translate(model_dir: Path, tmp_path: Path, *flags: str) -> list[str]:
    """Run ``translate`` in-process on :data:`SOURCES` with ``flags``; the output lines."""
    from seq2seq.translate import main

    source = tmp_path / "in.txt"
    source.write_text("".join(line + "\n" for line in SOURCES))
    output = tmp_path / f"out{len(list(tmp_path.iterdir()))}.txt"
    args = ["--model", str(model_dir), "--input", str(source), "--output", str(output)]
    assert main([*args, "--device", "cpu", *flags]) == 0
    return output.read_text().splitlines()


def test_sampling_is_repeatable_for_a_seed_and_top_k_1_is_greedy(model_dir, tmp_path):
    first = _translate(model_dir, tmp_path, "--sample", "--seed", "7")
    assert first == _translate(model_dir, tmp_path, "--sample", "--seed", "7")
    assert len(first) == len(SOURCES) and first[1] == ""  # one line per line, empty stays empty
    others = [_translate(model_dir, tmp_path, "--sample", "--seed", str(s)) for s in (8, 9)]
    assert any(other != first for other in others)  # it does draw: the seed matters
    greedy = _translate(model_dir, tmp_path, "--beam", "1")
    assert _translate(model_dir, tmp_path, "--sample", "--top-k", "1", "--seed", "1") == greedy
    assert _translate(model_dir, tmp_path, "--sample", "--temperature", "0") == greedy
    nucleus = _translate(model_dir, tmp_path, "--sample", "--top-p", "0.9", "--seed", "7")
    assert nucleus == _translate(model_dir, tmp_path, "--sample", "--top-p", "0.9", "--seed", "7")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sample", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
        (["--sample", "--top-k", "-1"], "--top-k must be an integer >= 0"),
        (["--sample", "--temperature", "nan"], "--temperature must be a finite number >= 0"),
        (["--sample", "--beam", "4"], "--beam 4 contradicts --sample"),
        (["--sample", "--nbest", "2"], "--nbest needs beam search"),
        (["--top-k", "5"], "--top-k needs --sample"),
        (["--seed", "1"], "--seed needs --sample"),
    ],
)
def test_sampling_options_are_checked(model_dir, tmp_path, capsys, flags, message):
    from seq2seq.translate import main

    source = tmp_path / "in.txt"
    source.write_text("hello\n")
    code = main(["--model", str(model_dir), "--input", str(source), "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def _write_pairs(tmp_path: Path) -> tuple[Path, Path]:
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("".join(line + "\n" for line in SOURCES))
    ref.write_text("".join(line[::-1] + "\n" for line in SOURCES))
    return src, ref


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_progress_only_on_a_terminal(model_dir, tmp_path, monkeypatch, capsys, terminal):
    from seq2seq import evaluate, translate

    src, ref = _write_pairs(tmp_path)
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    out = str(tmp_path / "hyp.txt")
    assert translate.main(["--model", str(model_dir), "--input", str(src), "--output", out]) == 0
    shown = stderr.getvalue()
    bar = "translate: 100%|"  # tqdm's bar: description, percentage, then the bar itself
    assert (bar in shown and f"{len(SOURCES)}/{len(SOURCES)}" in shown) == terminal, shown
    assert ("sent/s" in shown) == terminal
    stderr.seek(0), stderr.truncate()
    args = ["--model", str(model_dir), "--src", str(src), "--ref", str(ref)]
    assert evaluate.main(args) == 0
    assert ("perplexity: 100%|" in stderr.getvalue()) == terminal, stderr.getvalue()
    assert "perplexity = " in capsys.readouterr().out


def test_stdin_gets_no_progress_bar_even_on_a_terminal(model_dir, tmp_path, monkeypatch):
    from seq2seq import translate

    stderr = _Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\n")))
    out = str(tmp_path / "hyp.txt")
    assert translate.main(["--model", str(model_dir), "--output", out]) == 0
    assert "%|" not in stderr.getvalue() and "sent/s" not in stderr.getvalue()


def test_output_into_a_fifo_writes_into_it_and_keeps_it(model_dir, tmp_path):
    from seq2seq.translate import main

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    src, _ = _write_pairs(tmp_path)
    assert main(["--model", str(model_dir), "--input", str(src), "--output", str(fifo)]) == 0
    reader.join(timeout=30)
    assert received and received[0].count(b"\n") == len(SOURCES)
    assert stat.S_ISFIFO(fifo.stat().st_mode)  # still the pipe, not a file renamed over it


def test_nbest_widens_the_models_beam_and_is_refused_above_an_explicit_beam(
    model_dir, tmp_path, capsys
):
    from seq2seq.checkpoint import load_config_file
    from seq2seq.translate import main

    beam = load_config_file(model_dir).decode.beam_size
    wider = beam + 1
    lines = _translate(model_dir, tmp_path, "--nbest", str(wider))
    assert f"widens the model's beam {beam} to {wider}" in capsys.readouterr().err
    assert len(lines) == wider * len(SOURCES)
    assert lines == _translate(model_dir, tmp_path, "--nbest", str(wider), "--beam", str(wider))
    capsys.readouterr()
    source = tmp_path / "in.txt"
    code = main(["--model", str(model_dir), "--input", str(source), "--device", "cpu",
                 "--nbest", str(wider), "--beam", str(beam)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and f"--nbest {wider} exceeds --beam {beam}" in err and err.count("\n") == 1
