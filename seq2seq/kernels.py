"""Measured speed-ups that change no maths, each chosen by the hardware it runs on.

``model.py`` and ``loss.py`` show the equations; this module holds the faster ways of computing
three of them, with the measurements behind each choice in ``benchmarks/RESULTS.md``
(``benchmarks/bench_ops.py`` repeats them on any machine) and parity tests in
``tests/test_kernels.py``:

- :class:`Dropout`: the keep-mask drawn as 16-bit random integers (four per 64-bit draw);
- :func:`attention`: which scaled-dot-product kernel runs, by device, precision and CPU class;
- :class:`SmoothedNLL`: the label-smoothed loss with a hand-written backward that reuses one
  float32 buffer for logits, softmax and gradient;
- :func:`column_major_weights`: the weight matrices of a CPU model that decodes laid out so that
  each linear layer's matrix product reads them without a transpose.

Shape legend: b batch, h heads, t queries, s keys, d head width, n tokens, v vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from seq2seq.hardware import cpu_has_native_bf16

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
