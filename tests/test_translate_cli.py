"""translate's command line as a user meets it: an interactive dialogue over stdin, sampling,
and progress only on a terminal."""

from __future__ import annotations

import os
import queue
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
