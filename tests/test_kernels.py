"""The speed kernels compute the same maths as the plain formulations they stand in for."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

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


# --------------------------------------------------------------------------- float32 linear layers


def _float32_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The worst-case error of float32 dot products a @ b (any summation order): gamma_k |a| @ |b|,
    gamma_k = k u / (1 - k u), u = 2^-24, plus one rounding of the result; in float64."""
    k, u = a.shape[-1], 2.0**-24
    gamma = k * u / (1 - k * u)
    return (gamma + u) * (a.double().abs() @ b.double().abs())


@pytest.mark.skipif(
    not hasattr(torch.ops.mkldnn, "_linear_pointwise"), reason="torch built without oneDNN"
)
def test_onednn_linear_and_its_gradients_are_float32_products():
    """Forward, input, weight and bias gradients against float64, within the float32 bound;
    a transposed (strided) input and an upstream gradient that is a strided view as well."""
    generator = torch.Generator().manual_seed(0)
    x64 = torch.randn(7, 5, 48, dtype=torch.float64, generator=generator).transpose(0, 1)
    w64 = torch.randn(24, 48, dtype=torch.float64, generator=generator)
    b64 = torch.randn(24, dtype=torch.float64, generator=generator)
    up64 = torch.randn(24, 7, 5, dtype=torch.float64, generator=generator).permute(2, 1, 0)
    x, w, b = (t.float().requires_grad_() for t in (x64, w64, b64))
    out = kernels.OneDNNLinear.apply(x, w, b)
    out.backward(up64.float())
    x64.requires_grad_(), w64.requires_grad_(), b64.requires_grad_()
    F.linear(x64, w64, b64).backward(up64)

    def within(got, want, bound):
        assert (got.double() - want).abs().le(bound + 1e-12).all()

    rows_x, rows_up = x64.detach().reshape(-1, 48), up64.reshape(-1, 24)
    within(out.detach(), F.linear(x64, w64, b64).detach(), _float32_bound(x64.detach(), w64.t()))
    within(x.grad, x64.grad, _float32_bound(up64, w64.detach()))
    within(w.grad, w64.grad, _float32_bound(rows_up.t(), rows_x))
    within(b.grad, b64.grad, 35 * 2.0**-24 * rows_up.abs().sum(0))
    assert x.grad.shape == x.shape and w.grad.shape == w.shape and b.grad.shape == b.shape


def test_float32_linear_engages_only_for_float32_cpu_training_where_it_is_faster(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(kernels, "onednn_float32_linear_is_faster", lambda: True)
    assert isinstance(kernels.float32_linear(cpu, None, False), kernels._LinearOnOneDNN)
    for device, dtype, compiled in [
        (cpu, torch.bfloat16, False),  # autocast: oneDNN's bf16 path already
        (cpu, None, True),  # the compiler chooses its own kernels
        (torch.device("cuda"), None, False),
    ]:
        assert not isinstance(kernels.float32_linear(device, dtype, compiled), TorchFunctionMode)
    monkeypatch.setattr(kernels, "onednn_float32_linear_is_faster", lambda: False)
    assert not isinstance(kernels.float32_linear(cpu, None, False), TorchFunctionMode)


@pytest.mark.parametrize(
    ("vendor", "cls", "expected"),
    [
        ("AuthenticAMD", "avx512_bf16", True),  # MKL runs AVX2 code there
        ("AuthenticAMD", "avx512", True),
        ("AuthenticAMD", "avx2", False),  # same instructions in both libraries
        ("GenuineIntel", "amx", False),  # MKL uses AVX-512 on Intel
        ("GenuineIntel", "avx512_bf16", False),
    ],
)
def test_onednn_float32_linear_is_chosen_by_vendor_and_class(vendor, cls, expected, monkeypatch):
    monkeypatch.setattr(kernels, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(kernels, "cpu_class", lambda: cls)
    kernels.onednn_float32_linear_is_faster.cache_clear()
    try:
        available = hasattr(torch.ops.mkldnn, "_linear_pointwise")
        assert kernels.onednn_float32_linear_is_faster() == (expected and available)
    finally:
        kernels.onednn_float32_linear_is_faster.cache_clear()


def test_the_mode_routes_float32_linear_only_and_keeps_every_other_op():
    """Inside the mode nn.Linear (and F.linear with keywords) builds an OneDNNLinear node; bf16
    inputs, autocast and other functions pass through unchanged."""
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with kernels._LinearOnOneDNN():
        routed = layer(x)
        keyword = F.linear(input=x, weight=layer.weight, bias=layer.bias)
        plain = torch.tanh(x)
        half = F.linear(x.bfloat16(), layer.weight.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = layer(x)
    assert type(routed.grad_fn).__name__ == "OneDNNLinearBackward"
    assert type(keyword.grad_fn).__name__ == "OneDNNLinearBackward"
    assert type(plain.grad_fn).__name__ == "TanhBackward0"
    assert half.dtype == torch.bfloat16 and "OneDNN" not in type(half.grad_fn).__name__
    assert autocast.dtype == torch.bfloat16 and "OneDNN" not in type(autocast.grad_fn).__name__
    torch.testing.assert_close(routed, F.linear(x, layer.weight, layer.bias))


# --------------------------------------------------------------------------- decoding layers


needs_onednn = pytest.mark.skipif(
    not hasattr(torch.ops.mkldnn, "_linear_pointwise"), reason="torch built without oneDNN"
)


def _small_transformer(tie_output: bool = True):
    from seq2seq.config import ModelConfig
    from seq2seq.model import build_model

    torch.manual_seed(0)
    config = ModelConfig(
        d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2,
        tie_output=tie_output, share_embeddings=tie_output,
    )  # fmt: skip
    return build_model(config, 50, 50).eval()


@needs_onednn
@pytest.mark.parametrize("tie_output", [True, False])
def test_prepare_cpu_decoding_swaps_every_linear_layer_and_keeps_parameters(
    tie_output, monkeypatch
):
    """Where oneDNN is faster every nn.Linear becomes a DecodingLinear over the very same
    Parameters (same state dict names), the tied projection reads the embedding, and beam search
    finds the same outputs as the untouched model."""
    import copy

    from seq2seq.config import DecodeConfig
    from seq2seq.decoding import translate_ids

    monkeypatch.setattr(kernels, "onednn_float32_linear_is_faster", lambda: True)
    model = _small_transformer(tie_output)
    prepared = kernels.prepare_cpu_decoding(copy.deepcopy(model))
    assert prepared.prepared_for_cpu_decoding
    assert not any(type(m) is torch.nn.Linear for m in prepared.modules())
    # Encoder layers: attention and feed-forward; decoder: self, cross, feed-forward; an untied
    # output projection (a tied one is not registered on the model).
    expected = 2 * (4 + 2) + 2 * (4 + 4 + 2) + (0 if tie_output else 1)
    assert sum(isinstance(m, kernels.DecodingLinear) for m in prepared.modules()) == expected
    before, after = model.state_dict(), prepared.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    projection = prepared.decoder.output_projection
    assert isinstance(projection, kernels.DecodingLinear)
    if tie_output:
        assert projection.weight is prepared.decoder.embedding.weight
        assert prepared.output_projection is None  # nothing new is registered on the model
    else:
        assert projection is prepared.output_projection  # still one layer, held twice
    src = torch.randint(4, 50, (5, 9))
    tgt = torch.randint(4, 50, (5, 7))
    with torch.inference_mode():
        torch.testing.assert_close(prepared(src, tgt), model(src, tgt), rtol=1e-5, atol=1e-5)
    sources = [row.tolist() + [2] for row in src]
    decode = DecodeConfig(beam_size=3, max_len_a=0.0, max_len_b=12)
    ours, theirs = translate_ids(prepared, sources, decode), translate_ids(model, sources, decode)
    assert [h[0].tokens for h in ours] == [h[0].tokens for h in theirs]


def test_prepare_cpu_decoding_keeps_nn_linear_where_mkl_is_as_fast(monkeypatch):
    monkeypatch.setattr(kernels, "onednn_float32_linear_is_faster", lambda: False)
    prepared = kernels.prepare_cpu_decoding(_small_transformer())
    assert not any(isinstance(m, kernels.DecodingLinear) for m in prepared.modules())
    weight = prepared.decoder_layers[0].feed_forward.linear_in.weight
    assert weight.t().is_contiguous() and not weight.is_contiguous()  # still laid out
    assert not getattr(prepared, "prepared_for_cpu_decoding", False)  # translate_ids keeps the mode


def test_prepare_cpu_decoding_leaves_int8_layers_quantized(monkeypatch):
    from seq2seq.decoding import quantize_int8

    monkeypatch.setattr(kernels, "onednn_float32_linear_is_faster", lambda: True)
    quantized = kernels.prepare_cpu_decoding(quantize_int8(_small_transformer(), "cpu"))
    assert not any(isinstance(m, kernels.DecodingLinear) for m in quantized.modules())
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    assert isinstance(quantized.decoder.output_projection, DynamicQuantizedLinear)


@needs_onednn
def test_decoding_linear_is_a_float32_product_and_falls_back_where_it_must():
    """oneDNN for inference products of more than one row, within the float32 bound of the float64
    product; F.linear (MKL, autograd, autocast) for one row, with gradients, and under autocast."""
    generator = torch.Generator().manual_seed(0)
    w64 = torch.randn(24, 48, dtype=torch.float64, generator=generator)
    b64 = torch.randn(24, dtype=torch.float64, generator=generator)
    weight = torch.nn.Parameter(w64.float().t().contiguous().t())  # column-major, as prepared
    layer = kernels.DecodingLinear(weight, torch.nn.Parameter(b64.float()))
    for rows in (1, 2, 64):
        x64 = torch.randn(rows, 1, 48, dtype=torch.float64, generator=generator)
        with torch.inference_mode():
            out = layer(x64.float())
        bound = _float32_bound(x64, w64.t()) + 2.0**-24 * b64.abs()
        assert ((out.double() - (F.linear(x64, w64, b64))).abs() <= bound + 1e-12).all(), rows
    x = torch.randn(5, 48, requires_grad=True)
    layer(x).sum().backward()  # autograd records: F.linear's backward
    torch.testing.assert_close(x.grad, weight.detach().sum(0).expand(5, -1))
    assert weight.grad is not None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(5, 48)).dtype == torch.bfloat16


def _int8_layer(weight: torch.Tensor) -> kernels.Int8Linear:
    layer = kernels.Int8Linear(weight.shape[1], weight.shape[0])
    layer.set_weight_bias(torch.quantize_per_tensor(weight, 2**-7, 0, torch.qint8), None)
    return layer


@pytest.mark.parametrize("full_range", [False, True])
def test_int8_linear_sums_exactly_where_a_16_bit_pair_sum_would_saturate(full_range, monkeypatch):
    """Every activation at 255 against weights at 127: a 16-bit sum of two such products (64,770)
    would saturate at 32,767 and halve the output. Weights (127 / 128) and activations (255 / 16, an
    exact 8-bit and 7-bit grid point, zero at 0) quantize without error, so the float64 product is
    the answer to float32 rounding. Full range is what this machine's int8 layers use where
    :func:`kernels.int8_full_range_activations` says so; 7-bit activations everywhere."""
    if full_range and not kernels.int8_full_range_activations():
        pytest.skip("no AVX-512 VNNI: int8 layers keep 7-bit activations here")
    monkeypatch.setattr(kernels, "int8_full_range_activations", lambda: full_range)
    weight = torch.full((8, 64), 127 * 2**-7)
    x = torch.full((3, 64), 255 / 16)
    expected = x.double() @ weight.double().t()
    torch.testing.assert_close(_int8_layer(weight)(x).double(), expected, rtol=1e-6, atol=0)


def test_int8_linear_with_full_range_activations_is_closer_to_float32():
    """Activations spread over 8 bits rather than 7 halve the quantization step, and with weights
    on their int8 grid that step is the only error: its mean against the float64 product halves
    (0.50 of the 7-bit error with this seed)."""
    if not kernels.int8_full_range_activations():
        pytest.skip("no AVX-512 VNNI: int8 layers keep 7-bit activations here")
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randint(-127, 128, (256, 256), generator=generator) * 2**-7).float()
    x = torch.randn(64, 256, generator=generator)
    exact = x.double() @ weight.double().t()
    layer = _int8_layer(weight)
    full = (layer(x).double() - exact).abs().mean()
    packed = layer._packed_params._packed_params
    seven = (torch.ops.quantized.linear_dynamic(x, packed, True).double() - exact).abs().mean()
    assert full < 0.6 * seven


SATURATION_PROBE = """
import json, warnings
import torch
from seq2seq import kernels
warnings.simplefilter("ignore")
weight = torch.full((8, 64), 127 * 2**-7)
layer = kernels.Int8Linear(64, 8)
layer.set_weight_bias(torch.quantize_per_tensor(weight, 2**-7, 0, torch.qint8), None)
x = torch.full((3, 64), 255 / 16)
packed = layer._packed_params._packed_params
print(json.dumps({
    "full_range": kernels.int8_full_range_activations(),
    "layer": layer(x)[0, 0].item(),
    "eight_bits": torch.ops.quantized.linear_dynamic(x, packed, False)[0, 0].item(),
    "expected": (x.double() @ weight.double().t())[0, 0].item(),
}))
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="fbgemm is x86 only")
def test_int8_linear_keeps_7_bits_where_fbgemm_is_held_below_vnni():
    """``FBGEMM_ENABLE_INSTRUCTIONS=AVX2`` makes fbgemm sum pairs of products in 16 bits on any
    x86 CPU: there 8-bit activations saturate (the probe's raw product comes out near half), and
    our layer, which reads the variable, keeps 7 bits and stays exact."""
    environment = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    result = subprocess.run(
        [sys.executable, "-c", SATURATION_PROBE],
        env=environment, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["full_range"] is False
    assert probe["layer"] == pytest.approx(probe["expected"], rel=1e-6)
    assert probe["eight_bits"] < 0.6 * probe["expected"]  # 32,767 / 64,770 of it
