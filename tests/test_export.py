"""Export to Hugging Face Marian: same logits, same greedy output, survives save/load."""

from __future__ import annotations

import random

import pytest
import torch

from seq2seq.checkpoint import save_checkpoint
from seq2seq.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from seq2seq.export import ExportError, main, to_marian, width_permutation
from seq2seq.layers import sinusoidal_positions
from seq2seq.model import GPT, Transformer
from seq2seq.search import TransformerDecoder, greedy
from seq2seq.tokenizer import EOS_ID, PAD_ID, train_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 50


def tiny(**changes) -> ModelConfig:
    values = dict(
        d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, max_positions=64
    )
    return ModelConfig(**{**values, **changes})


def padded_batch(batch: int, length: int, lengths: list[int], eos: bool) -> torch.Tensor:
    tokens = torch.randint(4, VOCAB, (batch, length))
    for row, n in enumerate(lengths):
        tokens[row, n:] = PAD_ID
        if eos:
            tokens[row, n - 1] = EOS_ID
    return tokens


def marian_logits(marian, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return marian(input_ids=src, attention_mask=src != PAD_ID, decoder_input_ids=tgt_in).logits


def test_permuted_table_is_marians_sin_half_cos_half_table():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    table = sinusoidal_positions(20, 16)[:, width_permutation(16)]
    marian_table = MarianSinusoidalPositionalEmbedding(20, 16).create_weight()
    assert torch.allclose(table, marian_table, atol=1e-6)
    assert not torch.allclose(sinusoidal_positions(20, 16), marian_table, atol=1e-2)


@pytest.mark.parametrize(
    "changes, src_vocab",
    [
        ({}, VOCAB),
        ({"activation": "gelu"}, VOCAB),
        ({"tie_output": False}, VOCAB),
        ({"share_embeddings": False}, VOCAB + 7),
        ({"bias": False, "init": "gpt2"}, VOCAB),  # Marian's biases are then zeros
    ],
)
def test_exported_logits_equal_ours_on_padded_batches(changes, src_vocab):
    torch.manual_seed(0)
    model = Transformer(tiny(**changes), src_vocab, VOCAB)
    # Train a few steps so LayerNorm gains, biases and the PAD row are not at their init values.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        src = padded_batch(4, 9, [9, 6, 3, 5], eos=True)
        tgt = padded_batch(4, 7, [7, 5, 2, 6], eos=False)
        model(src, tgt).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    marian = to_marian(model)
    for lengths, tgt_lengths in (([9, 6, 3, 5], [7, 5, 2, 6]), ([4, 9, 1, 8], [1, 7, 3, 2])):
        src = padded_batch(4, 9, lengths, eos=True)
        tgt = padded_batch(4, 7, tgt_lengths, eos=False)
        with torch.no_grad():
            ours = model(src, tgt)
        theirs = marian_logits(marian, src, tgt)
        real = tgt != PAD_ID
        assert torch.allclose(ours[real], theirs[real], atol=1e-5, rtol=0)


def test_greedy_generate_equals_our_greedy_search():
    torch.manual_seed(1)
    model = Transformer(tiny(), VOCAB, VOCAB).eval()
    marian = to_marian(model)
    src = padded_batch(6, 10, [10, 7, 3, 9, 5, 2], eos=True)
    max_new = 12
    with torch.no_grad():
        ours = greedy(TransformerDecoder(model, src), 6, torch.full((6,), max_new))
        theirs = marian.generate(
            input_ids=src,
            attention_mask=src != PAD_ID,
            num_beams=1,
            do_sample=False,
            max_new_tokens=max_new,
            min_new_tokens=1,
            suppress_tokens=[PAD_ID, 2],  # we never generate PAD or BOS
        )
    theirs_tokens = [[t for t in row[1:] if t not in (EOS_ID, PAD_ID)] for row in theirs.tolist()]
    assert [h.tokens for h in ours] == theirs_tokens


def test_non_marian_models_are_refused_with_a_reason():
    with pytest.raises(ExportError, match="pre-norm"):
        to_marian(Transformer(tiny(norm_first=True), VOCAB, VOCAB))
    with pytest.raises(ExportError, match="sinusoids"):
        to_marian(Transformer(tiny(positions="learned"), VOCAB, VOCAB))
    with pytest.raises(ExportError, match="eps"):
        to_marian(Transformer(tiny(layer_norm_eps=1e-6), VOCAB, VOCAB))
    gpt = tiny(arch="gpt", n_encoder_layers=0, norm_first=True, positions="learned")
    with pytest.raises(ExportError, match="encoder-decoder"):
        to_marian(GPT(gpt, VOCAB))


def test_export_cli_round_trips_through_save_and_from_pretrained(tmp_path):
    rng = random.Random(3)
    words = "der die das haus katze hund the a house cat dog tree car red blue".split()
    text = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(300)]
    tokenizer = train_tokenizer(DataConfig(vocab_size=VOCAB), text, text, tmp_path / "tok")
    config = RunConfig(model=tiny(), train=TrainConfig(out_dir=str(tmp_path / "run")))
    torch.manual_seed(2)
    model = Transformer(config.model, VOCAB, VOCAB).eval()
    save_checkpoint(tmp_path / "model", model, config, tokenizer)

    assert main(["--model", str(tmp_path / "model"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    # from_pretrained recomputes Marian's own position table: the permuted width must match it.
    marian = transformers.MarianMTModel.from_pretrained(tmp_path / "hf").eval()
    src = padded_batch(3, 8, [8, 5, 2], eos=True)
    tgt = padded_batch(3, 6, [6, 4, 1], eos=False)
    with torch.no_grad():
        ours = model(src, tgt)
    real = tgt != PAD_ID
    assert torch.allclose(ours[real], marian_logits(marian, src, tgt)[real], atol=1e-5, rtol=0)

    hf_tokenizer = transformers.MarianTokenizer.from_pretrained(tmp_path / "hf")
    for sentence in ("der hund", "the red car and a cat", text[0]):
        expected = tokenizer.encode_source(sentence) + [EOS_ID]
        assert hf_tokenizer(sentence)["input_ids"] == expected
