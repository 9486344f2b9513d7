"""The bigram baseline: logits from the previous token alone, trained by the ordinary loop to the
text's conditional entropy, far below its unigram entropy."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from seq2seq import train as train_module
from seq2seq.checkpoint import load_model
from seq2seq.config import ConfigError, ModelConfig, config_from_dict
from seq2seq.model import Bigram, build_model

LETTERS = "abcdefghij"
SUCCESSOR_PROBS = (0.6, 0.3, 0.1)  # each letter is followed by one of three others


def markov_text(n: int, seed: int = 0) -> str:
    """A first-order Markov chain over ten letters, three successors each: its conditional
    entropy is ~0.9 nats, its unigram entropy ~1.7 (ln 10 = 2.3 if the letters were uniform)."""
    rng = random.Random(seed)
    successors = {c: rng.sample([d for d in LETTERS if d != c], 3) for c in LETTERS}
    text = [rng.choice(LETTERS)]
    for _ in range(n - 1):
        text.append(rng.choices(successors[text[-1]], SUCCESSOR_PROBS)[0])
    return "".join(text)


def entropies(text: str) -> tuple[float, float, float]:
    """Empirical unigram entropy, conditional entropy H(next | previous) from bigram counts, and
    the standard deviation of the per-token conditional log-loss (nats)."""
    unigram = Counter(text)
    total = sum(unigram.values())
    h_unigram = -sum(c / total * math.log(c / total) for c in unigram.values())
    pairs = Counter(zip(text, text[1:]))
    previous = Counter(text[:-1])
    n = len(text) - 1
    losses = {(a, b): -math.log(c / previous[a]) for (a, b), c in pairs.items()}
    h_conditional = sum(c * losses[pair] for pair, c in pairs.items()) / n
    variance = sum(c * (losses[pair] - h_conditional) ** 2 for pair, c in pairs.items()) / n
    return h_unigram, h_conditional, math.sqrt(variance)


def test_bigram_logits_depend_on_the_previous_token_only():
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="bigram"), 12, 12)
    assert isinstance(model, Bigram)
    assert sum(p.numel() for p in model.parameters()) == 12 * 12
    with torch.no_grad():
        model.next_token_logits.normal_()
    tokens = torch.tensor([[4, 5, 6, 7], [9, 5, 11, 7]])
    logits = model(tokens)
    assert torch.equal(logits, model.next_token_logits[tokens])
    assert torch.equal(logits[0, 1], logits[1, 1]) and torch.equal(logits[0, 3], logits[1, 3])


def test_bigram_needs_a_language_model_stream():
    with pytest.raises(ConfigError, match="model.arch=bigram needs data.format=lm"):
        config_from_dict({"model": {"arch": "bigram"}, "data": {"format": "text"}})


def test_bigram_trains_to_the_conditional_entropy(tmp_path: Path):
    text = markov_text(40_000)
    (tmp_path / "text.txt").write_text(text)
    valid_fraction = 0.1
    config = config_from_dict(
        {
            "model": {"arch": "bigram", "max_positions": 32},
            "data": dict(
                format="lm", path=str(tmp_path / "text.txt"), tokenizer="char",
                valid_fraction=valid_fraction,
            ),
            "prepare": dict(out_dir=str(tmp_path / "prepared"), num_workers=1),
            "batch": dict(block_size=32, batch_size=16, eval_batches=20),
            "train": dict(
                out_dir=str(tmp_path / "run"), max_steps=300, lr=0.1, min_lr=0.001,
                lr_schedule="cosine", warmup_steps=0, weight_decay=0.0, clip_norm=0.0,
                label_smoothing=0.0, precision="fp32", eval_every=300, save_every=300, log_every=1000, keep_last=1,
            ),
        }
    )  # fmt: skip
    result = train_module.train(config)
    h_unigram, h_conditional, spread = entropies(text)
    n_valid = int(len(text) * valid_fraction)
    # Tolerance: the validation split's own entropy differs from the whole text's by sampling
    # noise (4 standard errors over its n_valid positions; the random eval blocks overlap, so
    # they hold no more); the count estimate from the training split adds ~(free parameters) /
    # (2 n_train) = 20 / 72,000 nats; 0.02 nats allows for 300 updates of optimisation (4,800
    # blocks of 32, each of the 20 transitions seen ~24,000 times) not reaching the optimum.
    tolerance = 4 * spread / math.sqrt(n_valid) + 20 / (2 * (len(text) - n_valid)) + 0.02
    assert abs(result["valid_nll"] - h_conditional) < tolerance, (result, h_conditional)
    assert result["valid_nll"] < h_unigram - 0.6
    model, _, saved = load_model(tmp_path / "run" / "checkpoints" / "step_300")
    assert isinstance(model, Bigram) and saved.model.arch == "bigram"
