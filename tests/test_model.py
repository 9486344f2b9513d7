"""The model against the paper's formulas and PyTorch's reference layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from seq2seq.config import PRESETS, ModelConfig, config_from_dict
from seq2seq.layers import padding_mask, sinusoidal_positions
from seq2seq.model import GPT, Transformer, build_model, count_parameters
from seq2seq.tokenizer import BOS_ID, PAD_ID


def tiny_config(**changes) -> ModelConfig:
    values = dict(
        d_model=32,
        n_heads=4,
        d_ff=64,
        n_encoder_layers=2,
        n_decoder_layers=2,
        dropout=0.1,
        max_positions=64,
    )
    values.update(changes)
    return ModelConfig(**values)


def random_tokens(batch: int, length: int, vocab: int, lengths: list[int]) -> torch.Tensor:
    tokens = torch.randint(4, vocab, (batch, length))
    for row, n in enumerate(lengths):
        tokens[row, n:] = PAD_ID
    return tokens


# --------------------------------------------------------------------------- formulas


def test_positional_encoding_matches_section_3_5():
    table = sinusoidal_positions(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_embeddings_scaled_and_three_way_tied():
    model = Transformer(tiny_config(dropout=0.0), 40, 40).eval()
    assert model.source_embedding is model.target_embedding
    tokens = torch.tensor([[5, 6]])
    expected = model.target_embedding.weight[tokens] * math.sqrt(32)
    assert torch.allclose(model.target_embedding(tokens), expected)
    # logits are the decoder output times the shared embedding matrix
    assert model.output_projection is None
    untied = Transformer(tiny_config(share_embeddings=False), 30, 40)
    assert untied.source_embedding is not untied.target_embedding
    assert untied.source_embedding.weight.shape[0] == 30


@pytest.mark.parametrize(
    "preset, low, high", [("transformer_base", 63e6, 65e6), ("transformer_big", 212e6, 215e6)]
)
def test_paper_parameter_counts(preset, low, high):
    config = config_from_dict({"model": {"preset": preset}}).model
    with torch.device("meta"):
        model = build_model(config, 37000, 37000)
    assert low <= count_parameters(model) <= high


# --------------------------------------------------------------------------- reference parity


def copy_attention(ours, theirs: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        theirs.in_proj_weight.copy_(
            torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight])
        )
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)


def copy_feed_forward_and_norms(ours, theirs, blocks) -> None:
    with torch.no_grad():
        theirs.linear1.load_state_dict(ours.feed_forward.linear_in.state_dict())
        theirs.linear2.load_state_dict(ours.feed_forward.linear_out.state_dict())
        for index, block in enumerate(blocks, start=1):
            getattr(theirs, f"norm{index}").load_state_dict(block.norm.state_dict())


def pytorch_layer(layer_class: type[nn.Module], config: ModelConfig) -> nn.Module:
    """PyTorch's own encoder or decoder layer with ``config``'s sizes, batch-first."""
    return layer_class(
        config.d_model,
        config.n_heads,
        config.d_ff,
        dropout=config.dropout,
        activation=config.activation,
        batch_first=True,
        norm_first=config.norm_first,
    )


def reference_encoder_layer(ours, config: ModelConfig) -> nn.TransformerEncoderLayer:
    theirs = pytorch_layer(nn.TransformerEncoderLayer, config)
    copy_attention(ours.self_attention, theirs.self_attn)
    copy_feed_forward_and_norms(ours, theirs, [ours.self_attention_block, ours.feed_forward_block])
    return theirs.eval()


def reference_decoder_layer(ours, config: ModelConfig) -> nn.TransformerDecoderLayer:
    theirs = pytorch_layer(nn.TransformerDecoderLayer, config)
    copy_attention(ours.self_attention, theirs.self_attn)
    copy_attention(ours.cross_attention, theirs.multihead_attn)
    copy_feed_forward_and_norms(
        ours,
        theirs,
        [ours.self_attention_block, ours.cross_attention_block, ours.feed_forward_block],
    )
    return theirs.eval()


def real_positions(tokens: torch.Tensor) -> torch.Tensor:
    return tokens != PAD_ID


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_layers_match_pytorch_reference(norm_first, activation):
    config = tiny_config(norm_first=norm_first, activation=activation)
    model = Transformer(config, 50, 50).eval()
    src = random_tokens(3, 7, 50, [7, 4, 2])
    tgt = random_tokens(3, 5, 50, [5, 3, 1])
    x_src = torch.randn(3, 7, 32)
    x_tgt = torch.randn(3, 5, 32)

    encoder_layer = model.encoder_layers[0]
    theirs = reference_encoder_layer(encoder_layer, config)
    with torch.no_grad():
        ours_out = encoder_layer(x_src, padding_mask(src))
        theirs_out = theirs(x_src, src_key_padding_mask=src == PAD_ID)
    keep = real_positions(src)
    assert torch.allclose(ours_out[keep], theirs_out[keep], atol=1e-5)

    decoder_layer = model.decoder_layers[0]
    theirs = reference_decoder_layer(decoder_layer, config)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        ours_out = decoder_layer(x_tgt, x_src, padding_mask(src))
        theirs_out = theirs(
            x_tgt,
            x_src,
            tgt_mask=causal,
            tgt_key_padding_mask=tgt == PAD_ID,
            memory_key_padding_mask=src == PAD_ID,
        )
    keep = real_positions(tgt)
    assert torch.allclose(ours_out[keep], theirs_out[keep], atol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_full_model_matches_nn_transformer(norm_first):
    config = tiny_config(norm_first=norm_first)
    model = Transformer(config, 50, 50).eval()
    reference = nn.Transformer(
        config.d_model, config.n_heads, config.n_encoder_layers, config.n_decoder_layers,
        config.d_ff, config.dropout, batch_first=True, norm_first=norm_first,
    ).eval()  # fmt: skip
    for ours, theirs in zip(model.encoder_layers, reference.encoder.layers):
        copy_attention(ours.self_attention, theirs.self_attn)
        copy_feed_forward_and_norms(
            ours, theirs, [ours.self_attention_block, ours.feed_forward_block]
        )
    for ours, theirs in zip(model.decoder_layers, reference.decoder.layers):
        copy_attention(ours.self_attention, theirs.self_attn)
        copy_attention(ours.cross_attention, theirs.multihead_attn)
        blocks = [ours.self_attention_block, ours.cross_attention_block, ours.feed_forward_block]
        copy_feed_forward_and_norms(ours, theirs, blocks)
    if norm_first:
        reference.encoder.norm.load_state_dict(model.encoder_norm.state_dict())
        reference.decoder.norm.load_state_dict(model.decoder_norm.state_dict())
    else:  # the paper's post-norm stacks end with the last layer's own norm
        reference.encoder.norm = nn.Identity()
        reference.decoder.norm = nn.Identity()

    src = random_tokens(3, 9, 50, [9, 6, 3])
    tgt = random_tokens(3, 6, 50, [6, 4, 2])
    with torch.no_grad():
        ours = model(src, tgt)
        src_embedded = model.source_positions(model.source_embedding(src))
        tgt_embedded = model.target_positions(model.target_embedding(tgt))
        hidden = reference(
            src_embedded,
            tgt_embedded,
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(6),
            src_key_padding_mask=src == PAD_ID,
            tgt_key_padding_mask=tgt == PAD_ID,
            memory_key_padding_mask=src == PAD_ID,
        )
        theirs = hidden @ model.target_embedding.weight.T
    keep = real_positions(tgt)
    assert torch.allclose(ours[keep], theirs[keep], atol=1e-5)


# --------------------------------------------------------------------------- masking


def test_decoder_is_causal():
    model = Transformer(tiny_config(), 50, 50).eval()
    src = random_tokens(2, 6, 50, [6, 6])
    tgt = random_tokens(2, 8, 50, [8, 8])
    changed = tgt.clone()
    changed[:, 5:] = torch.randint(4, 50, (2, 3))
    with torch.no_grad():
        before, after = model(src, tgt), model(src, changed)
    assert torch.allclose(before[:, :5], after[:, :5], atol=1e-6)
    assert not torch.allclose(before[:, 5:], after[:, 5:], atol=1e-3)


def test_gpt_is_causal():
    model = GPT(tiny_config(arch="gpt", norm_first=True, positions="learned"), 50).eval()
    tokens = torch.randint(4, 50, (2, 10))
    changed = tokens.clone()
    changed[:, 6:] = torch.randint(4, 50, (2, 4))
    past = tokens.clone()
    past[:, 2] = torch.where(tokens[:, 2] == 4, 5, 4)  # another token at position 2 only
    with torch.no_grad():
        reference = model(tokens)
        assert torch.allclose(reference[:, :6], model(changed)[:, :6], atol=1e-6)
        seen = model(past)
    # A model that ignored its input (or all but the last token) would pass the check above.
    assert torch.allclose(reference[:, :2], seen[:, :2], atol=1e-6)
    for position in range(2, 10):
        assert not torch.allclose(reference[:, position], seen[:, position], atol=1e-4), position


def test_pad_content_never_changes_real_outputs():
    """Garbage in the embedded vectors at pad positions must not leak into real positions."""
    model = Transformer(tiny_config(), 50, 50).eval()
    src = random_tokens(2, 7, 50, [7, 3])
    tgt = random_tokens(2, 6, 50, [6, 2])

    def scramble_pads(tokens):
        def hook(module, inputs, output):
            noise = torch.randn_like(output) * 10
            return torch.where((tokens == PAD_ID)[..., None], noise, output)

        return hook

    with torch.no_grad():
        reference = model(src, tgt)
        handles = [
            model.source_positions.register_forward_hook(scramble_pads(src)),
            model.target_positions.register_forward_hook(scramble_pads(tgt)),
        ]
        changed = model(src, tgt)
        for handle in handles:
            handle.remove()
    keep = real_positions(tgt)
    assert torch.allclose(reference[keep], changed[keep], atol=1e-5)
    assert not torch.allclose(reference[~keep], changed[~keep], atol=1e-3)


def test_padding_extra_columns_changes_nothing():
    model = Transformer(tiny_config(), 50, 50).eval()
    src = random_tokens(2, 5, 50, [5, 3])
    tgt = random_tokens(2, 4, 50, [4, 2])
    padded_src = torch.cat([src, torch.full((2, 3), PAD_ID)], dim=1)
    padded_tgt = torch.cat([tgt, torch.full((2, 2), PAD_ID)], dim=1)
    with torch.no_grad():
        short, long = model(src, tgt), model(padded_src, padded_tgt)[:, :4]
    keep = real_positions(tgt)
    assert torch.allclose(short[keep], long[keep], atol=1e-5)


# --------------------------------------------------------------------------- incremental decoding


@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_decoding_equals_full_forward(norm_first):
    model = Transformer(tiny_config(norm_first=norm_first), 50, 50).eval()
    src = random_tokens(3, 7, 50, [7, 5, 2])
    tgt = torch.cat([torch.full((3, 1), BOS_ID), torch.randint(4, 50, (3, 6))], dim=1)
    with torch.no_grad():
        full = model(src, tgt)
        state = model.start_decoding(model.encode(src))
        steps = [model.decode_step(tgt[:, i : i + 1], state) for i in range(7)]
        assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
        # prefill several positions at once, then continue one by one
        state = model.start_decoding(model.encode(src))
        chunked = [model.decode_step(tgt[:, :4], state)]
        chunked += [model.decode_step(tgt[:, i : i + 1], state) for i in range(4, 7)]
        assert torch.allclose(torch.cat(chunked, dim=1), full, atol=1e-5)


def test_cache_reorder_follows_beams():
    model = Transformer(tiny_config(), 50, 50).eval()
    src = random_tokens(3, 6, 50, [6, 4, 3])
    tgt = torch.cat([torch.full((3, 1), BOS_ID), torch.randint(4, 50, (3, 4))], dim=1)
    order = torch.tensor([2, 0, 0])  # duplicate one row and drop another, as beam search does
    with torch.no_grad():
        state = model.start_decoding(model.encode(src))
        model.decode_step(tgt[:, :3], state)
        state.reorder(order)
        continued = model.decode_step(tgt[order, 3:], state)
        full = model(src[order], tgt[order])
    assert torch.allclose(continued, full[:, 3:], atol=1e-5)


def test_gpt_cached_decoding_and_reorder():
    model = GPT(tiny_config(arch="gpt", norm_first=True, positions="learned"), 50).eval()
    tokens = torch.randint(4, 50, (3, 9))
    with torch.no_grad():
        full = model(tokens)
        state = model.start_decoding()
        parts = [model.decode_step(tokens[:, :5], state)]
        parts += [model.decode_step(tokens[:, i : i + 1], state) for i in range(5, 9)]
        assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
        order = torch.tensor([1, 1, 2])
        state = model.start_decoding()
        model.decode_step(tokens[:, :6], state)
        state.reorder(order)
        continued = torch.cat(
            [model.decode_step(tokens[order, i : i + 1], state) for i in range(6, 9)], dim=1
        )
    assert torch.allclose(continued, model(tokens[order])[:, 6:], atol=1e-5)


def test_positions_beyond_maximum_raise():
    model = GPT(tiny_config(arch="gpt", max_positions=8), 50)
    with pytest.raises(ValueError, match="max_positions"):
        model(torch.randint(4, 50, (1, 9)))


def _expected_parameters(c: ModelConfig, vocab_size: int) -> int:
    """Parameters of the paper's layers counted by hand (with ``bias``: biases on every linear
    layer, two vectors per LayerNorm); shared embeddings and a tied output count once."""
    d, ff, b = c.d_model, c.d_ff, int(c.bias)
    attention, feed_forward, norm = 4 * (d * d + b * d), d * ff + ff * d + b * (ff + d), (1 + b) * d
    total = vocab_size * d  # target embedding (= source embedding = output projection)
    positions = c.max_positions * d if c.positions == "learned" else 0
    decoder_layer = attention + feed_forward + 2 * norm
    if c.arch == "transformer":
        decoder_layer += attention + norm  # cross-attention
        total += c.n_encoder_layers * (attention + feed_forward + 2 * norm) + positions
        total += 0 if c.share_embeddings else vocab_size * d
    total += c.n_decoder_layers * decoder_layer + positions
    total += 0 if c.tie_output else vocab_size * d
    final_norms = 1 if c.arch == "gpt" else 2
    return total + (final_norms * norm if c.norm_first else 0)


def test_every_preset_has_the_parameters_its_layers_add_up_to():
    for name, values in PRESETS.items():
        config = ModelConfig(preset=name, **values)
        config.validate()
        with torch.device("meta"):
            model = build_model(config, 1000, 1000)
        assert isinstance(model, GPT if config.arch == "gpt" else Transformer)
        assert count_parameters(model) == _expected_parameters(config, 1000), name
    # A published figure: GPT-2 small (byte-level BPE of 50,257 tokens) has 124,439,808.
    with torch.device("meta"):
        gpt2 = build_model(ModelConfig(preset="gpt2_small", **PRESETS["gpt2_small"]), 0, 50257)
    assert count_parameters(gpt2) == 124_439_808
    # gpt_mini made bias-free is nanoGPT's character-level Shakespeare model (65 characters).
    nano = {**PRESETS["gpt_mini"], "bias": False, "init": "gpt2", "scale_embedding": False}
    with torch.device("meta"):
        mini = build_model(ModelConfig(preset="gpt_mini", **nano), 0, 65)
    assert count_parameters(mini) == 4 * 12 * 128**2 + 9 * 128 + (65 + 64) * 128 == 804_096
    assert not [name for name, _ in mini.named_parameters() if name.endswith(".bias")]


@pytest.mark.parametrize("arch", ["gpt", "transformer"])
def test_bias_free_model_has_no_biases_and_still_decodes_as_it_trains(arch):
    config = tiny_config(arch=arch, norm_first=True, positions="learned", bias=False)
    model = build_model(config, 50, 50).eval()
    assert not [name for name, _ in model.named_parameters() if "bias" in name]
    assert count_parameters(model) == _expected_parameters(config, 50)
    tokens = torch.randint(4, 50, (2, 6))
    with torch.no_grad():
        if arch == "gpt":
            full, state = model(tokens), model.start_decoding()
        else:
            src = random_tokens(2, 5, 50, [5, 3])
            full, state = model(src, tokens), model.start_decoding(model.encode(src))
        steps = torch.cat([model.decode_step(tokens[:, i : i + 1], state) for i in range(6)], 1)
    assert torch.allclose(steps, full, atol=1e-5)


def test_gpt2_init_draws_the_documented_scales():
    """N(0, 0.02) everywhere, N(0, 0.02 / sqrt(N)) on the projections into the residual stream
    (N residual sums per stack: 2 per GPT layer, 3 per decoder layer with cross-attention)."""
    torch.manual_seed(0)
    d, layers = 256, 4
    gpt = GPT(tiny_config(arch="gpt", d_model=d, d_ff=4 * d, n_decoder_layers=layers,
                          norm_first=True, positions="learned", init="gpt2"), 500)  # fmt: skip
    seq = Transformer(tiny_config(d_model=d, d_ff=4 * d, n_encoder_layers=2, n_decoder_layers=3,
                                  init="gpt2"), 500, 500)  # fmt: skip
    cases = [
        (gpt.token_embedding.weight[1:], 0.02),  # the padding row is zero
        (gpt.layers[0].self_attention.q_proj.weight, 0.02),
        (gpt.layers[2].feed_forward.linear_in.weight, 0.02),
        (gpt.layers[1].self_attention.out_proj.weight, 0.02 / math.sqrt(2 * layers)),
        (gpt.layers[3].feed_forward.linear_out.weight, 0.02 / math.sqrt(2 * layers)),
        (seq.encoder_layers[1].feed_forward.linear_out.weight, 0.02 / math.sqrt(2 * 2)),
        (seq.decoder_layers[0].cross_attention.out_proj.weight, 0.02 / math.sqrt(3 * 3)),
    ]
    for weight, std in cases:
        # n >= 65,536 draws: the sample std is within 5% of sigma with overwhelming probability
        # (its relative standard error is 1 / sqrt(2n) < 0.3%), the mean within 0.05 sigma.
        assert abs(weight.std().item() / std - 1) < 0.05, (weight.shape, std)
        assert abs(weight.mean().item()) < 0.05 * std
    assert torch.all(gpt.token_embedding.weight[PAD_ID] == 0)
    for model in (gpt, seq):
        biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
        assert biases and all(torch.all(b == 0) for b in biases)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_dropout_keep_rate_and_scaling(p):
    """The 16-bit mask drops a fraction p (to 1/65536) and keeps the expectation unchanged."""
    from seq2seq.layers import Dropout

    torch.manual_seed(0)
    dropout = Dropout(p).train()
    x = torch.ones(400, 1000)
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / x.numel()) ** 0.5 + 1 / 65536
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-4)
    assert abs(y.mean().item() - 1.0) < 0.01
    # neighbouring 16-bit lanes of one 64-bit draw are independent
    pairs = (y.reshape(-1, 2) == 0).float()
    both = (pairs[:, 0] * pairs[:, 1]).mean().item()
    assert abs(both - p * p) < 0.01
    assert torch.equal(dropout.eval()(x), x)


def test_cache_reorder_keeps_no_doubling_headroom():
    """Beam search reorders every step; the fresh buffers hold the prefix and the next position,
    not the doubled capacity of the growing ones (which held ~40 MiB more at beam 5, RESULTS.md)."""
    model = Transformer(tiny_config(), 50, 50).eval()
    src = random_tokens(2, 6, 50, [6, 4])
    with torch.no_grad():
        state = model.start_decoding(model.encode(src))
        for position in range(20):
            model.decode_step(torch.full((2, 1), 4 + position), state)
        assert state.layers[0].buffers[0].shape[0] > 21  # grown with headroom (doubling)
        state.reorder(torch.tensor([1, 1, 0]))
        assert [buffer.shape[:2] for buffer in state.layers[0].buffers] == [(21, 3)] * 2
