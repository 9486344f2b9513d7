"""Label-smoothed cross-entropy over non-pad target tokens (Vaswani et al. 2017, section 5.4).

Shape legend: b batch, t target length, v vocab, n flattened tokens (b*t).

Smoothing convention: the target distribution is ``q = (1 - eps) * onehot(y) + eps / v`` for every
one of the ``v`` vocabulary entries, i.e. ``eps`` spread *uniformly over the whole vocabulary*,
the target included (Szegedy et al. 2016, eq. 4; also ``torch.nn.functional.cross_entropy`` with
``label_smoothing``). Fairseq instead gives ``eps / (v - 1)`` to each non-target entry, so the
target keeps exactly ``1 - eps``; the two differ by ``eps / v`` of mass on the target. The loss
per token is

    loss = -sum_j q_j log p_j = (1 - eps) * nll + (eps / v) * sum_j (-log p_j)

The function returns *sums* over non-pad tokens and the token count; the caller normalises (the
trainer divides by the number of target tokens across all ranks and micro-batches).
"""

from __future__ import annotations

import torch

from seq2seq.kernels import SmoothedNLL
from seq2seq.tokenizer import PAD_ID


def label_smoothed_nll(
    logits: torch.Tensor,
    target: torch.Tensor,
    epsilon: float,
    ignore_index: int = PAD_ID,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum of the label-smoothed loss and of the plain NLL over non-ignored target tokens.

    The softmax is computed in float32 even when ``logits`` come from bf16/fp16 autocast, so the
    loss sums keep full precision. Forward and backward are fused by hand
    (``seq2seq.kernels.SmoothedNLL``): the (tokens x vocab) matrix is a large share of a small
    model's step, and autograd's version reads and writes it several more times.

    Args:
        logits: ``(b, t, v)`` or ``(n, v)`` unnormalised scores.
        target: ``(b, t)`` or ``(n,)`` token ids; positions equal to ``ignore_index`` are skipped.
        epsilon: smoothing mass in ``[0, 1)``; 0 gives plain cross-entropy.
        ignore_index: id excluded from the loss and the count (padding).

    Returns:
        ``(loss_sum, nll_sum, n_tokens)``: two float32 scalars (float64 for float64 logits) and an
        int64 scalar tensor, all on the logits' device (no host synchronisation).
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match target {tuple(target.shape)}")
    vocab = logits.size(-1)
    target = target.reshape(-1)
    keep = target != ignore_index
    # Ignored positions get weight 0; id 0 keeps the gather in range for any ignore_index (-100).
    safe_target = torch.where(keep, target, 0)
    loss_sum, nll_sum = SmoothedNLL.apply(logits.reshape(-1, vocab), safe_target, keep, epsilon)
    return loss_sum, nll_sum, keep.sum()
