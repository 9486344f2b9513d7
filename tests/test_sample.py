"""sample: seeded determinism, greedy equivalence with uncached decoding, windowing, CLI."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import pytest
import torch

from seq2seq.checkpoint import load_model, save_checkpoint
from seq2seq.config import ModelConfig, RunConfig, replace
from seq2seq.model import build_model
from seq2seq.sample import generate, generate_ids, main, start_ids
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID, CharVocab, Tokenizer

MAX_POSITIONS = 16
CHARS = "abcdefgh \n"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model_config = ModelConfig(
        arch="gpt", d_model=32, n_heads=4, d_ff=64, n_encoder_layers=0, n_decoder_layers=2,
        dropout=0.0, activation="gelu", norm_first=True, positions="learned",
        max_positions=MAX_POSITIONS, tie_output=False,
    )  # fmt: skip
    config = replace(
        RunConfig(model=model_config),
        data={"format": "lm", "tokenizer": "char"},
        decode={"max_new_tokens": 30, "temperature": 1.0},
    )
    tokenizer = Tokenizer("char", CharVocab(CHARS))
    model = build_model(config.model, tokenizer.vocab_size, tokenizer.vocab_size)
    # An untied output and strong position vectors keep a random model's greedy text from
    # repeating one character, so the windowing below is really exercised.
    with torch.no_grad():
        model.positions.table.normal_(0.0, 1.0)
    return save_checkpoint(tmp_path_factory.mktemp("models") / "gpt", model, config, tokenizer)


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Argmax (specials excluded) with a full forward each step over the documented window: at
    most max_positions tokens, restarting from the last max_positions // 2 on overflow."""
    tokens, start = list(prompt), max(0, len(prompt) - MAX_POSITIONS)
    for _ in range(n):
        if len(tokens) - start > MAX_POSITIONS:
            start = len(tokens) - MAX_POSITIONS // 2
        logits = model(torch.tensor([tokens[start:]]))[0, -1]
        logits[[PAD_ID, BOS_ID, EOS_ID]] = float("-inf")
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :]


@torch.inference_mode()
def test_top_k_one_and_zero_temperature_equal_uncached_greedy(model_dir):
    model, tokenizer, _ = load_model(model_dir)
    prompt = tokenizer.encode_target("abc ")
    want = greedy_reference(model, prompt, 40)  # 40 > max_positions: the window restarts
    assert len(set(want)) > 3
    gen = torch.Generator().manual_seed(0)
    assert generate_ids(model, prompt, 40, temperature=1.0, top_k=1, generator=gen) == want
    assert generate_ids(model, prompt, 40, temperature=0.0) == want
    long_prompt = tokenizer.encode_target("abcdefgh" * 3)  # longer than max_positions
    assert generate_ids(model, long_prompt, 5, temperature=0.0) == greedy_reference(
        model, long_prompt, 5
    )


def test_same_seed_same_text_and_top_p_tiny_is_greedy(model_dir):
    model, tokenizer, config = load_model(model_dir)
    decode = config.decode
    first = generate(model, tokenizer, "ab", decode, seed=7)
    assert first == generate(model, tokenizer, "ab", decode, seed=7)
    assert first.startswith("ab") and len(first) == 2 + decode.max_new_tokens
    others = {generate(model, tokenizer, "ab", decode, seed=s) for s in range(8, 12)}
    assert len(others | {first}) > 1
    greedy = generate(model, tokenizer, "ab", dataclasses.replace(decode, temperature=0.0))
    nucleus = dataclasses.replace(decode, top_p=1e-6)  # keeps only the most probable token
    assert generate(model, tokenizer, "ab", nucleus, seed=3) == greedy
    assert start_ids(tokenizer) == tokenizer.encode_target("\n")
    assert start_ids(Tokenizer("char", CharVocab("ab"))) == [BOS_ID]


def test_cli_prompt_stdin_and_wrong_model(model_dir, tmp_path, capsys, monkeypatch):
    argv = ["--model", str(model_dir), "--seed", "5", "--max-new-tokens", "12"]
    assert main(argv + ["--prompt", "hab"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("hab") and len(out.out.rstrip("\n")) >= 3 + 12 - 1
    assert "tokens/s" in out.err
    monkeypatch.setattr("sys.stdin", io.StringIO("hab"))
    assert main(argv) == 0
    assert capsys.readouterr().out == out.out
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(argv + ["--top-k", "3", "--top-p", "0.9", "--temperature", "0.7"]) == 0
    assert main(argv + ["--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err

    seq2seq_config = RunConfig(
        model=ModelConfig(d_model=16, n_heads=2, d_ff=16, n_encoder_layers=1, n_decoder_layers=1)
    )
    seq2seq_config = replace(seq2seq_config, data={"tokenizer": "char"})
    tokenizer = Tokenizer("char", CharVocab(CHARS))
    model = build_model(seq2seq_config.model, tokenizer.vocab_size, tokenizer.vocab_size)
    other = save_checkpoint(tmp_path / "t", model, seq2seq_config, tokenizer)
    assert main(["--model", str(other), "--prompt", "a"]) == 2
    assert "not a GPT model" in capsys.readouterr().err
