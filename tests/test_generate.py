"""GPT.generate: seeded determinism, top_k=1 equals uncached greedy, lengths, max_positions."""

from __future__ import annotations

import pytest
import torch

from seq2seq.config import ModelConfig
from seq2seq.model import build_model
from seq2seq.sample import generate_ids
from seq2seq.tokenizer import BOS_ID, EOS_ID, N_SPECIAL, PAD_ID

MAX_POSITIONS = 16
VOCAB = N_SPECIAL + 10


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    config = ModelConfig(
        arch="gpt", d_model=32, n_heads=4, d_ff=64, n_encoder_layers=0, n_decoder_layers=2,
        dropout=0.0, activation="gelu", norm_first=True, positions="learned",
        max_positions=MAX_POSITIONS, tie_output=False,
    )  # fmt: skip
    model = build_model(config, VOCAB, VOCAB)
    # Strong position vectors keep a random model's greedy output from repeating one token.
    with torch.no_grad():
        model.positions.table.normal_(0.0, 1.0)
    return model.eval()


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """Argmax (PAD/BOS/EOS excluded) of a full forward, no cache, one token at a time, over the
    documented window: the last max_positions tokens, restarting from the last max_positions // 2
    when the context fills up."""
    tokens, start = list(prompt), max(0, len(prompt) - MAX_POSITIONS)
    with torch.no_grad():
        for _ in range(n):
            if len(tokens) - start > MAX_POSITIONS:
                start = len(tokens) - MAX_POSITIONS // 2
            logits = model(torch.tensor([tokens[start:]]))[0, -1]
            logits[[PAD_ID, BOS_ID, EOS_ID]] = float("-inf")
            tokens.append(int(logits.argmax()))
    return tokens


def test_top_k_one_equals_uncached_greedy_past_max_positions(gpt):
    prompts = torch.tensor([[4, 5, 6], [9, 8, 7]])
    out = gpt.generate(prompts, 40, top_k=1, seed=0)  # 40 > max_positions: the window restarts
    assert out.shape == (2, 3 + 40)
    for row, prompt in zip(out.tolist(), prompts.tolist()):
        want = greedy_reference(gpt, prompt, 40)
        assert len(set(want[3:])) > 3  # a real sequence, not one repeated token
        assert row == want
    assert gpt.generate(prompts[0], 40, temperature=0.0).tolist() == out[0].tolist()
    long_prompt = torch.arange(2 * MAX_POSITIONS) % 10 + N_SPECIAL  # cropped to its last 16
    got = gpt.generate(long_prompt, 5, top_k=1)
    assert got.tolist() == greedy_reference(gpt, long_prompt.tolist(), 5)


def test_same_seed_same_tokens_and_global_rng_untouched(gpt):
    prompt = torch.tensor([[4, 5]])
    state = torch.get_rng_state()
    first = gpt.generate(prompt, 30, temperature=1.0, top_p=0.9, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, gpt.generate(prompt, 30, temperature=1.0, top_p=0.9, seed=7))
    assert not torch.equal(first, gpt.generate(prompt, 30, temperature=1.0, top_p=0.9, seed=8))
    assert not set(first[0, 2:].tolist()) & {PAD_ID, BOS_ID, EOS_ID}
    # The same tokens as `seq2seq sample` draws from the same seed.
    generator = torch.Generator().manual_seed(7)
    assert first[0, 2:].tolist() == generate_ids(gpt, [4, 5], 30, 1.0, 0, 0.9, generator)


def test_lengths_mode_and_errors(gpt):
    prompt = torch.tensor([4, 5, 6])
    assert torch.equal(gpt.generate(prompt, 0), prompt)
    assert gpt.generate(prompt, 7, seed=1).shape == (3 + 7,)
    gpt.train()
    try:
        gpt.generate(prompt, 2, seed=1)
        assert gpt.training
    finally:
        gpt.eval()
    with pytest.raises(ValueError, match="non-empty prompt"):
        gpt.generate(torch.zeros(1, 0, dtype=torch.long), 3)
