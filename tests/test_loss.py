"""Label-smoothed NLL against a closed form worked by hand and against PyTorch's cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seq2seq.loss import label_smoothed_nll
from seq2seq.tokenizer import PAD_ID


def test_closed_form_small_case():
    # Probabilities (1/4, 1/2, 1/4) for every position; targets 1, 0 and one pad (PAD_ID = 0 is
    # also a real column of the vocabulary, it only marks padding in the target).
    logits = torch.log(torch.tensor([1.0, 2.0, 1.0])).expand(1, 3, 3).clone()
    target = torch.tensor([[1, 2, PAD_ID]])
    eps = 0.3
    loss, nll, n_tokens = label_smoothed_nll(logits, target, eps)
    log2 = math.log(2.0)
    # -sum_j log p_j = log 4 + log 2 + log 4 = 5 log 2 for every token.
    # token 1 (p = 1/2): nll = log 2; loss = 0.7 log 2 + 0.1 * 5 log 2 = 1.2 log 2
    # token 2 (p = 1/4): nll = 2 log 2; loss = 0.7 * 2 log 2 + 0.5 log 2 = 1.9 log 2
    assert n_tokens.item() == 2
    assert nll.item() == pytest.approx(3.0 * log2, rel=1e-6)
    assert loss.item() == pytest.approx(3.1 * log2, rel=1e-6)


def test_matches_torch_cross_entropy_with_smoothing():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 7, 11, generator=generator)
    target = torch.randint(1, 11, (4, 7), generator=generator)
    target[0, 5:] = PAD_ID
    target[2, 1:] = PAD_ID
    loss, nll, n_tokens = label_smoothed_nll(logits, target, 0.1)
    flat_logits, flat_target = logits.reshape(-1, 11), target.reshape(-1)
    expected = F.cross_entropy(
        flat_logits, flat_target, ignore_index=PAD_ID, label_smoothing=0.1, reduction="sum"
    )
    expected_nll = F.cross_entropy(flat_logits, flat_target, ignore_index=PAD_ID, reduction="sum")
    assert n_tokens.item() == int((target != PAD_ID).sum())
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, expected_nll)


def test_zero_epsilon_is_plain_nll_and_flat_input_works():
    logits = torch.randn(5, 9)
    target = torch.tensor([4, 0, 8, 1, 0])
    loss, nll, n_tokens = label_smoothed_nll(logits, target, 0.0)
    assert n_tokens.item() == 3
    assert torch.equal(loss, nll)
    expected = -torch.log_softmax(logits, -1)[[0, 2, 3], [4, 8, 1]].sum()
    torch.testing.assert_close(nll, expected)


def test_bf16_logits_reduce_in_float32():
    logits = torch.randn(2, 6, 50).to(torch.bfloat16)
    target = torch.randint(1, 50, (2, 6))
    loss, nll, _ = label_smoothed_nll(logits, target, 0.1)
    assert loss.dtype == torch.float32 and nll.dtype == torch.float32
    reference, _, _ = label_smoothed_nll(logits.float(), target, 0.1)
    torch.testing.assert_close(loss, reference)


def test_gradient_flows_and_shape_mismatch_is_reported():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    target = torch.tensor([[1, 2, 0], [3, 0, 0]])
    loss, _, _ = label_smoothed_nll(logits, target, 0.1)
    loss.backward()
    assert torch.all(logits.grad[0, 2] == 0) and logits.grad[0, 0].abs().sum() > 0
    with pytest.raises(ValueError, match="do not match"):
        label_smoothed_nll(logits, target[:, :2], 0.1)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("ignore_index", [PAD_ID, -100])
def test_hand_written_backward_equals_autograd(epsilon, ignore_index):
    """The fused backward against autograd through log_softmax, for any mix of the two outputs."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 6, 13, generator=generator, dtype=torch.float64)
    target = torch.randint(1, 13, (3, 6), generator=generator)
    target[1, 3:] = ignore_index
    ours = logits.clone().requires_grad_(True)
    reference = logits.clone().requires_grad_(True)
    loss, nll, _ = label_smoothed_nll(ours, target, epsilon, ignore_index=ignore_index)
    (0.7 * loss + 0.3 * nll).backward()
    keep = target.reshape(-1) != ignore_index
    log_probs = torch.log_softmax(reference.reshape(-1, 13)[keep], dim=-1)
    ref_nll = -log_probs.gather(-1, target.reshape(-1)[keep][:, None]).sum()
    ref_loss = (1 - epsilon) * ref_nll - (epsilon / 13) * log_probs.sum()
    (0.7 * ref_loss + 0.3 * ref_nll).backward()
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(nll, ref_nll)
    torch.testing.assert_close(ours.grad, reference.grad)
    assert torch.all(ours.grad[1, 3:] == 0)
    assert torch.equal(ours.detach(), logits)  # the caller's float logits are not overwritten


def test_bf16_gradient_matches_float32_reference():
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(40, 300, generator=generator).to(torch.bfloat16).requires_grad_(True)
    target = torch.randint(0, 300, (40,), generator=generator)
    loss, _, _ = label_smoothed_nll(logits, target, 0.1)
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16
    reference = logits.detach().float().requires_grad_(True)
    expected = F.cross_entropy(
        reference, target, ignore_index=PAD_ID, label_smoothing=0.1, reduction="sum"
    )
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(logits.grad.float(), reference.grad, atol=4e-3, rtol=1e-2)
