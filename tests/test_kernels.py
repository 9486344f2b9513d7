"""The speed kernels compute the same maths as the plain formulations they stand in for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from seq2seq import hardware, kernels


def _qkv(b=3, h=2, t=7, s=7, d=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=generator) for n in (t, s, s)]


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_attention_equals_sdpa_in_float64(causal):
    """Same maths as SDPA, forward and backward; float64 leaves only order-of-summation rounding."""
    q, k, v = (x.double().requires_grad_() for x in _qkv())
    mask = None
    if not causal:  # a key padding mask: the last two keys of row 0 and the last of row 2 hidden
        mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
        mask[0, ..., 5:] = False
        mask[2, ..., 6:] = False
    ours = kernels.explicit_attention(q, k, v, mask, 0.0, causal)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    their_grads = torch.autograd.grad(theirs.square().sum(), (q, k, v))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    for a, b in zip(grads, their_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_explicit_attention_gives_masked_keys_zero_weight():
    q, k, v = _qkv()
    mask = torch.ones(3, 1, 1, 7, dtype=torch.bool)
    mask[:, ..., 4:] = False
    changed = v.clone()
    changed[:, :, 4:] = 1e3  # values behind the mask cannot reach the output
    torch.testing.assert_close(
        kernels.explicit_attention(q, k, v, mask, 0.0, False),
        kernels.explicit_attention(q, k, changed, mask, 0.0, False),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("cls", ["amx", "avx2"])
def test_bf16_training_attention_stays_within_bf16_rounding_of_float32(cls, monkeypatch):
    """Whichever kernel the class picks under bf16 autocast, the result is float32 attention up to
    bf16 rounding: inputs, scores, probabilities and output each rounded once to 8 significant
    bits (relative 2^-9), so with |v| <= 4 here the error stays within a few times 4 * 2^-8."""
    monkeypatch.setattr(hardware, "cpu_class", lambda: cls)
    q, k, v = (x.clamp(-4, 4).requires_grad_() for x in _qkv(b=4, h=2, t=20, s=20, d=32))
    expected = "explicit" if cls == "amx" else "math"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.attention_kernel(q, k.size(-2)) == expected
        out = kernels.attention(q, k, v, None, 0.0, True)
    assert out.dtype == torch.bfloat16
    with sdpa_kernel(SDPBackend.MATH):
        reference = F.scaled_dot_product_attention(
            q.detach(), k.detach(), v.detach(), is_causal=True
        )
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=4 * 4 * 2**-8)


def test_kernel_choice_by_precision_and_mode(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_class", lambda: "amx")
    q = torch.randn(1, 1, 4, 8)
    assert kernels.attention_kernel(q, 4) == "sdpa"  # fp32 training: PyTorch's own (flash)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.attention_kernel(q, 4) == "explicit"
        assert kernels.attention_kernel(q, kernels.SHORT_KEYS + 1) == "sdpa"
        with torch.no_grad():
            assert kernels.attention_kernel(q, 4) == "sdpa"  # inference: flash
    monkeypatch.setattr(hardware, "cpu_class", lambda: "avx2")
    assert kernels.attention_kernel(q.bfloat16(), 4) == "math"


@torch.inference_mode()
def test_column_major_weights_change_layout_not_maths():
    import copy

    from seq2seq.config import DecodeConfig, ModelConfig
    from seq2seq.decoding import translate_ids
    from seq2seq.model import build_model

    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2)
    model = build_model(config, 50, 50).eval()
    laid_out = kernels.column_major_weights(copy.deepcopy(model))
    before, after = dict(model.named_parameters()), dict(laid_out.named_parameters())
    assert before.keys() == after.keys()
    for name, parameter in after.items():
        assert torch.equal(parameter, before[name]), name  # same shape and values
        if parameter.dim() == 2:
            assert parameter.t().is_contiguous() and not parameter.is_contiguous(), name
    # The tied output projection is still the embedding itself.
    assert laid_out.decoder.embedding is laid_out.source_embedding  # shared and tied, still one
    assert laid_out.output_projection is None
    src = torch.randint(4, 50, (5, 9))
    tgt = torch.randint(4, 50, (5, 7))
    # Only the matrix products' summation order may change: float32 rounding, not a new result.
    torch.testing.assert_close(laid_out(src, tgt), model(src, tgt), rtol=1e-5, atol=1e-5)
    sources = [row.tolist() + [2] for row in src]
    decode = DecodeConfig(beam_size=3, max_len_a=0.0, max_len_b=12)
    ours, theirs = translate_ids(laid_out, sources, decode), translate_ids(model, sources, decode)
    assert [h[0].tokens for h in ours] == [h[0].tokens for h in theirs]
