"""Measured speed-ups that change no maths, each chosen by the hardware it runs on.

``model.py`` and ``loss.py`` show the equations; this module holds the faster ways of computing
some of them, with the measurements behind each choice in ``benchmarks/RESULTS.md``
(``benchmarks/bench_ops.py`` repeats them on any machine) and parity tests in
``tests/test_kernels.py``:

- :class:`Dropout`: the keep-mask drawn as 16-bit random integers (four per 64-bit draw);
- :func:`attention`: which scaled-dot-product kernel runs, by device, precision and CPU class;
- :class:`SmoothedNLL`: the label-smoothed loss with a hand-written backward that reuses one
  float32 buffer for logits, softmax and gradient;
- :func:`column_major_weights`: the weight matrices of a CPU model that decodes laid out so that
  each linear layer's matrix product reads them without a transpose;
- :func:`prepare_cpu_decoding`: that layout plus :class:`DecodingLinear` layers, which pick the
  float32 library per call without a mode that intercepts every other operator, and the decoder's
  step as one TorchScript graph (:mod:`seq2seq.scripted`);
- :func:`float32_linear`: float32 linear layers of CPU training and decoding on oneDNN instead of
  MKL where MKL runs below the CPU's vector width (AMD with AVX-512);
- :class:`Int8Linear`: int8 decoding's linear layers with 8-bit rather than 7-bit activations
  where the CPU's int8 instructions cannot overflow (:func:`int8_full_range_activations`).

Shape legend: b batch, h heads, t queries, s keys, d head width, n tokens, v vocabulary.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

from seq2seq.hardware import cpu_class, cpu_flags, cpu_has_native_bf16, cpu_vendor

# --------------------------------------------------------------------------- dropout


class Dropout(nn.Module):
    """Inverted dropout: the maths of ``nn.Dropout`` with a cheaper mask on CPU.

    Four 16-bit keep-decisions come from each 64-bit random draw, ``p`` is rounded to a multiple
    of 1/65536 and kept values are scaled by the exact ``1 / (1 - p_rounded)``. The Bernoulli
    sampler of ``nn.Dropout`` took 4.5x as long for a (195, 20, 256) mask on an AMX Xeon, and the
    same ratio held with ATen's kernels lowered to AVX2 (``ATEN_CPU_CAPABILITY=avx2``): random
    number generation is scalar code on every x86 class, so one choice serves all. CUDA keeps
    PyTorch's fused dropout.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768  # keep a 16-bit value v when v >= threshold
        self.scale = 65536 / (32768 - self.threshold) if self.threshold < 32768 else 0.0

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        draws = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        keep = draws.view(torch.int16)[:n].view(x.shape) >= self.threshold
        return x * keep * self.scale


# --------------------------------------------------------------------------- attention

# Up to this many keys the (b, h, t, s) probabilities are small enough to materialise; the choice
# below was measured at 20 and 64 keys (Multi30k and nanoGPT shapes).
SHORT_KEYS = 128


def explicit_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, is_causal: bool
) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v written out as three ops: (b,h,t,d) x (b,h,s,d) -> (b,h,t,d).

    ``mask`` is boolean (True = may attend) and broadcasts to (b, h, t, s).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.size(-1) ** -0.5
    if is_causal:
        t, s = q.size(-2), k.size(-2)
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()  # as SDPA: top-left
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probabilities = F.dropout(probabilities, dropout_p, training=True)
    return torch.matmul(probabilities, v)


def attention_kernel(q: Tensor, n_keys: int) -> str:
    """Which kernel :func:`attention` runs: ``"sdpa"`` (PyTorch's pick), ``"math"`` or ``"explicit"``.

    Only CPU training in bf16 over short keys departs from PyTorch's own pick (flash on CPU), where
    flash's backward is slow (forward+backward at (195, 4, 20, 64), ms; benchmarks/RESULTS.md):

    ============================  =====  ====  ========
    CPU class, precision          flash  math  explicit
    ============================  =====  ====  ========
    AMX, bf16                      79     31      19
    AMX lowered to AVX2, bf16      37     30      63
    AMX, fp32                      21     24      20
    ============================  =====  ====  ========

    With native bf16 the three plain matmul/softmax ops win (AMX runs the matmuls at full speed);
    without it every explicit bf16 matmul falls to a reference kernel, and the math backend (which,
    by its timing, avoids that kernel) is the fastest. In fp32 and for inference flash is kept.
    """
    low_precision = torch.is_autocast_enabled("cpu") or q.dtype != torch.float32
    if q.device.type != "cpu" or not torch.is_grad_enabled() or not low_precision:
        return "sdpa"
    if n_keys > SHORT_KEYS:
        return "sdpa"
    return "explicit" if cpu_has_native_bf16() else "math"


def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout_p: float, is_causal: bool
) -> Tensor:
    """Scaled dot-product attention (b,h,t,d) x (b,h,s,d) -> (b,h,t,d) on the fastest kernel here."""
    kernel = attention_kernel(q, k.size(-2))
    if kernel == "explicit":
        return explicit_attention(q, k, v, mask, dropout_p, is_causal)
    if kernel == "math":
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
            )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal
    )


# --------------------------------------------------------------------------- loss


class SmoothedNLL(torch.autograd.Function):
    """Both loss sums from one float32 copy of the logits, which the backward turns into the gradient.

    With ``z`` the logits of one token, ``lse = logsumexp(z)`` and ``w`` 1 for kept tokens else 0:
    ``nll = w (lse - z_y)``, the uniform term ``sum_j -log p_j = v lse - sum_j z_j``, and
    ``d loss / dz = w (softmax(z) - q)``. Padding rows stay in the matrix with weight 0: selecting
    the kept rows would copy the logits forward and scatter zeros into a full-size gradient back.
    Autograd's formulation read and wrote the (n, v) matrix several more times: 394 -> 156 ms (fp32)
    per forward+backward at 3,705 x 8,000 on an AMX Xeon (benchmarks/RESULTS.md).

    ``apply(logits (n, v), target (n,), keep (n,) bool, epsilon) -> (loss_sum, nll_sum)``.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, keep: Tensor, epsilon: float):
        z = logits if logits.dtype == torch.float64 else logits.float()
        weight = keep.to(z.dtype)
        lse = torch.logsumexp(z, dim=-1)
        nll_sum = ((lse - z.gather(-1, target[:, None]).squeeze(-1)) * weight).sum()
        loss_sum = nll_sum
        if epsilon > 0.0:
            uniform_sum = ((lse * z.size(-1) - z.sum(dim=-1)) * weight).sum()
            loss_sum = (1.0 - epsilon) * nll_sum + (epsilon / z.size(-1)) * uniform_sum
        ctx.save_for_backward(z, lse, target, weight)
        ctx.epsilon, ctx.logits_dtype, ctx.owns_buffer = epsilon, logits.dtype, z is not logits
        return loss_sum, nll_sum

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_nll: Tensor):
        z, lse, target, weight = ctx.saved_tensors
        eps, vocab = ctx.epsilon, z.size(-1)
        # The float32 copy is ours to overwrite; fp32 logits belong to the caller.
        grad = z.sub_(lse[:, None]) if ctx.owns_buffer else z - lse[:, None]
        grad.exp_().mul_((weight * (grad_loss + grad_nll))[:, None])
        if eps > 0.0:
            grad.sub_((weight * (grad_loss * eps / vocab))[:, None])
        target_grad = weight * (grad_loss * (1.0 - eps) + grad_nll)
        grad.scatter_add_(-1, target[:, None], -target_grad[:, None])
        return grad.to(ctx.logits_dtype), None, None, None


# --------------------------------------------------------------------------- decoding weights


def column_major_weights(model: nn.Module) -> nn.Module:
    """Lay out every 2-D weight of a CPU ``model`` column-major, in place; return ``model``.

    ``F.linear(x, w)`` multiplies by ``w.t()``; with ``w`` stored column-major that is a plain
    row-major (in, out) matrix, which MKL's sgemm runs 1.2-2.3x faster when ``x`` has few rows (8-64,
    as in greedy decoding and the last steps of every batch) and as fast from ~200 rows on (AMX
    Xeon, one thread; benchmarks/RESULTS.md, "Decoding: ours vs CTranslate2"). Shapes, values and
    tied matrices (the output projection shares the embedding's ``Parameter``) are unchanged;
    embedding lookups read strided rows, a few thousand numbers per step. For inference: a model
    laid out this way is saved by nothing in this package (safetensors wants contiguous tensors).
    Models on other devices are returned as they are.
    """
    with torch.no_grad():
        for parameter in model.parameters():
            if (
                parameter.device.type == "cpu"
                and parameter.dim() == 2
                and parameter.is_contiguous()
            ):
                parameter.data = parameter.data.t().contiguous().t()
    return model


def prepare_cpu_decoding(model: nn.Module) -> nn.Module:
    """Ready a model for decoding: :func:`column_major_weights`, and where oneDNN runs float32
    products faster than MKL (:func:`onednn_float32_linear_is_faster`) every ``nn.Linear``, and
    the tied output projection, replaced by a :class:`DecodingLinear` over the same parameters.
    In place; returns ``model``. Models on other devices, or whose linear layers are quantized,
    keep the layers they have. Last, a CPU model's decoder stack gets its single-token step as a
    TorchScript graph over the same parameters (:mod:`seq2seq.scripted`; the same outputs, fewer
    trips through the interpreter).

    :func:`float32_linear`'s mode reaches the same kernels but runs a Python function for every
    operator of a step (views, adds, attention...), not only for the linear layers, and decoding
    is many small operators: on a Zen 5 EPYC, one thread, Multi30k test2016, greedy search took
    3.09 s (median of 10) with these layers against 3.54 s with the mode, with identical outputs;
    beam 5 did not move beyond the noise (benchmarks/RESULTS.md).
    :func:`seq2seq.decoding.translate_ids` leaves the mode out for a model prepared here.
    """
    column_major_weights(model)
    if any(p.device.type != "cpu" for p in model.parameters()):
        return model
    decoder = getattr(model, "decoder", None)  # the stack, held unregistered beside its parts
    if onednn_float32_linear_is_faster():
        _decoding_linear_layers(model, decoder)
    if decoder is not None:
        from seq2seq.scripted import attach

        attach(decoder)  # last: the graph holds the parameters as they are now
    return model


def _decoding_linear_layers(model: nn.Module, decoder: nn.Module | None) -> None:
    """Every float32 ``nn.Linear`` of ``model`` (and the tied projection) as a DecodingLinear."""
    replaced: dict[nn.Module, DecodingLinear] = {}
    parents = list(model.modules()) + (list(decoder.modules()) if decoder is not None else [])
    for parent in parents:
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:  # one replacement per layer, wherever it is held
                if child not in replaced:
                    replaced[child] = DecodingLinear(child.weight, child.bias)
                setattr(parent, name, replaced[child])
    if decoder is not None and getattr(decoder, "output_projection", False) is None:
        # Tied: the stack multiplies by its embedding matrix through F.linear; give it a layer.
        decoder.output_projection = DecodingLinear(decoder.embedding.weight, None)
    model.prepared_for_cpu_decoding = True


# Up to this many rows MKL's product beats oneDNN's fixed cost per call (one thread, Zen 5, one
# row: 5-97 us against 12-106 us for (256 -> 256) to (256 -> 8,000); two rows: MKL ahead only
# at 256 -> 256, 8 against 11 us, and 2x behind at 256 -> 8,000; five rows: oneDNN 1.4-4.3x).
MKL_MAX_ROWS = 1


class DecodingLinear(nn.Module):
    """``x W^T + b`` for a CPU model that decodes, sharing the ``weight`` and ``bias`` Parameters
    of the layer it replaces (same names, so a state dict reads the same): float32 inference
    products with more than :data:`MKL_MAX_ROWS` rows on oneDNN, everything else (one row,
    autocast, autograd, other dtypes) through ``F.linear`` as ``nn.Linear`` would.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: Tensor) -> Tensor:
        if (
            x.dtype is torch.float32
            and x.numel() > MKL_MAX_ROWS * x.shape[-1]
            and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and self.weight.dtype is torch.float32
        ):
            return _onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


# --------------------------------------------------------------------------- float32 linear layers


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., in) @ weight (out, in)^T + bias on oneDNN's float32 matmul; strided views allowed."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDNNLinear(torch.autograd.Function):
    """``F.linear`` whose three matrix products (forward, input and weight gradients) run on oneDNN.

    ``apply(x (..., in), weight (out, in), bias (out,) or None) -> (..., out)``; saves what
    ``F.linear``'s own backward saves (the input and the weight).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_linear(grad, weight.t(), None)  # (..., out) @ (out, in)
        rows = grad.reshape(-1, grad.size(-1))
        if ctx.needs_input_grad[1]:  # (out, n) @ (n, in)
            grad_weight = _onednn_linear(rows.t(), x.reshape(-1, x.size(-1)).t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


class _LinearOnOneDNN(TorchFunctionMode):
    """Sends every float32 CPU ``F.linear`` (``nn.Linear`` calls it) to oneDNN: through
    :class:`OneDNNLinear` when autograd records, straight to the product otherwise."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (
                x.dtype == weight.dtype == torch.float32
                and x.device.type == weight.device.type == "cpu"
                and not torch.is_autocast_enabled("cpu")
            ):
                if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
                    return OneDNNLinear.apply(x, weight, bias)
                return _onednn_linear(x, weight, bias)
        return func(*args, **kwargs)


@functools.cache
def onednn_float32_linear_is_faster() -> bool:
    """True on CPUs whose float32 matmuls run faster on oneDNN than on MKL: AMD with AVX-512.

    MKL (PyTorch's float32 GEMM on x86) runs its AVX2 code on AMD processors. On an AMD EPYC with
    AVX-512 (Zen 5 class, 2 threads) its 2048^3 peak was 188 GFLOP/s, the AVX2 FMA peak, while
    oneDNN's AVX-512 kernel ran (2048 x 256) x (256 x 1024) at 2.2x MKL's speed forward and 2x
    for the input gradient (benchmarks/RESULTS.md). On Intel MKL uses AVX-512 itself, and on an
    AVX2-only CPU both libraries run the same instructions, so MKL stays.
    """
    return (
        cpu_vendor() == "AuthenticAMD"
        and cpu_class() in ("avx512", "avx512_bf16", "amx")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def float32_linear(device: torch.device | str, dtype: torch.dtype | None, compiled: bool = False):
    """A context for a training forward or a decoding search: float32 CPU linear layers on the
    faster library here.

    ``dtype`` is the autocast dtype (None = float32). Nothing changes under autocast, on CUDA, for a
    compiled model (the compiler picks its own kernels) or where MKL is as fast
    (:func:`onednn_float32_linear_is_faster`). Both libraries compute the same products in float32;
    they differ only in the order of the sums (rounding, ~1e-6 relative). The choice holds in the
    thread that enters the context (PyTorch keeps such modes per thread).
    """
    if torch.device(device).type != "cpu" or dtype is not None or compiled:
        return contextlib.nullcontext()
    if not onednn_float32_linear_is_faster():
        return contextlib.nullcontext()
    return _LinearOnOneDNN()


# --------------------------------------------------------------------------- int8 linear layers


@functools.cache
def int8_full_range_activations() -> bool:
    """True where PyTorch's dynamic int8 products may quantize activations to all 8 bits.

    fbgemm multiplies unsigned 8-bit activations by signed 8-bit weights. Without AVX-512 VNNI it
    adds each pair of products in 16 bits (``vpmaddubsw``), which saturates (255 x 127 x 2 >
    32,767), so ``torch.ao``'s dynamic ``Linear`` always quantizes activations to 7 bits
    (``reduce_range=True``). With VNNI (``vpdpbusd``) the products go straight into 32-bit sums and
    the eighth bit is free. On a Zen 5 EPYC (``bench_decode.py``, Multi30k test2016 de->en,
    benchmarks/RESULTS.md) the outputs that differ from float32 fell from 185 to 124 (beam 5) and
    from 193 to 137 (greedy) of 1,000, at the same speed. fbgemm picks its kernels by the
    hardware's own flags, so these are read, not ``cpu_class()``, unless
    ``FBGEMM_ENABLE_INSTRUCTIONS`` holds it to an instruction set without VNNI (under ``AVX2``
    or ``AVX512`` a sum of 255 x 127 products came out at half its value with 8 bits).
    """
    forced = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").strip().upper()
    if forced in ("AVX2", "AVX512", "AVX512_256"):
        return False
    return "avx512_vnni" in cpu_flags()


class Int8Linear(DynamicQuantizedLinear):
    """``torch.ao``'s dynamically quantized ``Linear`` (int8 weights, activations quantized per
    call), with 8-bit activations where :func:`int8_full_range_activations` allows them."""

    def forward(self, x: Tensor) -> Tensor:
        if self._packed_params.dtype != torch.qint8 or not int8_full_range_activations():
            return super().forward(x)
        packed = self._packed_params._packed_params
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=False).to(x.dtype)
