"""The speed-ups of the training step on nanoGPT's CPU setting compute what they replace."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

from seq2seq.train import _scale_and_clip

FAULTS_SCRIPT = """
import resource, sys, torch
from seq2seq.trainsetup import keep_freed_memory

def faults_per_round():
    for _ in range(3):  # warm up: the first rounds map the memory whatever the settings
        blocks = [torch.ones(2 * 2**20) for _ in range(3)]  # 3 x 8 MiB, touched
        del blocks
    # The median round: a kernel that reclaims idle pages now and then (DAMON) can fault one
    # block of one round back in, which says nothing about reuse.
    counts = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        blocks = [torch.ones(2 * 2**20) for _ in range(3)]
        del blocks
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return sorted(counts)[len(counts) // 2]

if sys.argv[1] == "kept":
    with keep_freed_memory():
        print(faults_per_round())
else:
    print(faults_per_round())
"""


def _reference(grads: list[torch.Tensor], scale: float, clip_norm: float) -> tuple[float, list]:
    """What train_step did before: scale every gradient, then ``clip_grad_norm_``."""
    params = [nn.Parameter(torch.zeros_like(g)) for g in grads]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    torch._foreach_mul_([p.grad for p in params], scale)
    max_norm = clip_norm if clip_norm > 0 else float("inf")
    norm = float(nn.utils.clip_grad_norm_(params, max_norm))
    return norm, [p.grad for p in params]


@pytest.mark.parametrize("clip_norm", [0.0, 1.0, 1e4])
def test_scale_and_clip_equals_scaling_then_clip_grad_norm(clip_norm):
    generator = torch.Generator().manual_seed(0)
    shapes = [(128, 128), (128,), (512, 128), (69, 128), (1,)]
    grads = [torch.randn(shape, generator=generator) * 30 for shape in shapes]
    scale = 1 / 768
    expected_norm, expected = _reference(grads, scale, clip_norm)
    norm, factor = _scale_and_clip(grads, scale, clip_norm)
    torch._foreach_mul_(grads, factor)
    assert norm == pytest.approx(expected_norm, rel=1e-6)
    if clip_norm == 1.0:  # the case that clips: the result has the clipping norm
        assert expected_norm > 1.0
        assert float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))) == (
            pytest.approx(1.0, rel=1e-5)
        )
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=0)


def test_scale_and_clip_without_gradients():
    assert _scale_and_clip([], 0.5, 1.0) == (0.0, 0.5)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    """Fresh interpreters (glibc's thresholds untouched): freed 8 MiB blocks are reused."""

    # glibc itself, on 4 KiB pages: no tcmalloc preload, no huge pages (which fault 2 MiB at once).
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["THP_MEM_ALLOC_ENABLE"] = "0"

    def faults(mode: str) -> float:
        done = subprocess.run(
            [sys.executable, "-c", FAULTS_SCRIPT, mode],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        return float(done.stdout)

    default, kept = faults("default"), faults("kept")
    pages = 3 * 8 * 2**20 / 4096
    # Whether glibc's own adaptive thresholds give the blocks back varies from run to run (they
    # rise as blocks are freed), so the default is only a bound; the kept run's median round must
    # not fault.
    assert kept <= default
    assert kept < 0.02 * pages
