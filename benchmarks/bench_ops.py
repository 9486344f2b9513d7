"""Micro-benchmarks behind the design choices in RESULTS.md (forward + backward).

    python benchmarks/bench_ops.py                 # every group, 2 threads
    python benchmarks/bench_ops.py --only loss,adam --threads 1

Groups (shapes are those of a transformer_small step on a 4,096-token Multi30k batch):
  - ``dropout``: how the keep-mask is drawn: ``torch.rand >= p`` (ours before), the Bernoulli
    sampler of ``nn.Dropout``, and 16-bit random integers (four masks per 64-bit draw; ours now);
  - ``attention``: SDPA with the math backend, SDPA flash, and explicit matmul-softmax-matmul, on
    Multi30k and nanoGPT shapes, with the kernel ``seq2seq.kernels.attention`` picks for training
    on this CPU class (explicit under native bf16, math under emulated bf16, flash in fp32);
  - ``loss``: ``seq2seq.loss.label_smoothed_nll`` (hand-written backward, one float32 buffer for
    logits, softmax and gradient, no row selection) against the autograd formulation it replaced;
  - ``adam``: ``torch.optim.AdamW`` per-tensor (the CPU default), ``foreach`` and ``fused``;
  - ``linear``: float32 matrix products on MKL (``F.linear``, PyTorch's default) and on oneDNN
    (``seq2seq.kernels``), at decoding shapes (column-major weights) and the three products of a
    training step (forward, input and weight gradients), with the library
    ``seq2seq.kernels.float32_linear`` picks on this CPU.

Each group measures the library's current choice against the alternatives it was chosen over.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from seq2seq import hardware, kernels  # noqa: E402
from seq2seq.config import PRESETS, ModelConfig, load_config  # noqa: E402
from seq2seq.loss import label_smoothed_nll  # noqa: E402
from seq2seq.model import build_model  # noqa: E402
from seq2seq.tokenizer import PAD_ID  # noqa: E402


def timed(run: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Best of three windows of ``repeats`` calls, in milliseconds per call."""
    for _ in range(warmup):
        run()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 1000 * best


# ----------------------------------------------------------------------------- candidates


def autograd_smoothed_nll(logits, target, epsilon):  # noqa: ANN001
    """The formulation ``seq2seq.loss`` used before its hand-written backward: kept rows selected,
    float32 ``log_softmax``, ``gather`` and ``sum``, differentiated by autograd."""
    vocab = logits.size(-1)
    logits, target = logits.reshape(-1, vocab), target.reshape(-1)
    keep = target != PAD_ID
    log_probs = F.log_softmax(logits[keep].float(), dim=-1)
    nll = -log_probs.gather(-1, target[keep].unsqueeze(-1)).sum()
    return (1.0 - epsilon) * nll - (epsilon / vocab) * log_probs.sum(), nll


def explicit_attention(q, k, v, causal: bool):  # noqa: ANN001
    scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5
    if causal:
        t = q.size(-2)
        future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# ----------------------------------------------------------------------------- groups


def bench_dropout() -> None:
    shape, p = (195, 20, 256), 0.1
    n = 195 * 20 * 256
    threshold = int(-32768 + p * 65536)
    variants = {
        "torch.rand >= p (ours before)": lambda: torch.rand(shape) >= p,
        "bernoulli_ (nn.Dropout)": lambda: torch.empty(shape).bernoulli_(1 - p),
        "16-bit random integers (seq2seq.kernels.Dropout)": lambda: (
            torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64)
            .view(torch.int16)[:n]
            .view(shape)
            >= threshold
        ),
    }
    print(f"\n### dropout keep-mask, {shape}, p={p}\n\n| variant | ms |\n|---|---|")
    for name, run in variants.items():
        print(f"| {name} | {timed(run, 20):.2f} |")


def bench_attention() -> None:
    print("\n### attention forward + backward\n")
    print(f"CPU class {hardware.cpu_class()}\n")
    print("| shape (b, h, t, d) | causal | precision | SDPA math | SDPA flash | explicit | ours |")
    print("|---|---|---|---|---|---|---|")
    for shape, causal in (
        ((195, 4, 20, 64), False),
        ((195, 4, 20, 64), True),
        ((12, 4, 64, 32), True),
    ):
        for precision in ("fp32", "bf16"):
            inputs = [torch.randn(shape) for _ in range(3)]
            cells = []
            for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, None):

                def run(backend=backend, inputs=inputs, precision=precision, causal=causal):
                    q, k, v = (x.clone().requires_grad_() for x in inputs)
                    with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                        if backend is None:
                            out = explicit_attention(q, k, v, causal)
                        else:
                            with sdpa_kernel(backend):
                                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    out.float().sum().backward()

                cells.append(f"{timed(run, 10):.2f}")
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                q = inputs[0].requires_grad_()
                picked = kernels.attention_kernel(q, shape[2])
                inputs[0] = q.detach()
            picked = {"sdpa": "flash (PyTorch's pick)"}.get(picked, picked)
            print(f"| {shape} | {causal} | {precision} | " + " | ".join(cells) + f" | {picked} |")


def bench_loss() -> None:
    n, vocab = 3705, 8000
    target = torch.randint(4, vocab, (n,))
    target[-95:] = PAD_ID
    print(f"\n### label-smoothed loss forward + backward, ({n}, {vocab}) logits, 95 pad rows\n")
    print("| logits dtype | seq2seq.loss (fused) | autograd (before) | max abs grad difference |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        base = (3 * torch.randn(n, vocab)).to(dtype)
        grads = []
        cells = []
        for function in (label_smoothed_nll, autograd_smoothed_nll):

            def run(function=function, keep_grad=False, base=base, grads=grads):
                logits = base.clone().requires_grad_()
                loss, nll = function(logits, target, 0.1)[:2]
                (loss + 0.5 * nll).backward()
                if keep_grad:
                    grads.append(logits.grad.float())

            run(keep_grad=True)
            cells.append(f"{timed(run, 3):.0f} ms")
        gap = (grads[0] - grads[1]).abs().max().item()
        print(f"| {str(dtype).removeprefix('torch.')} | " + " | ".join(cells) + f" | {gap:.1e} |")


def bench_adam() -> None:
    gpt = load_config(
        harness.REPO / "recipes" / "configs" / "shakespeare_gpt.yaml", ["data.path=x"]
    )
    models = {
        "gpt_mini (Shakespeare)": build_model(gpt.model, 69, 69),
        "transformer_small (8k vocab)": build_model(
            ModelConfig(**PRESETS["transformer_small"]), 8000, 8000
        ),
    }
    print("\n### AdamW step\n\n| model | tensors | per-tensor (default) | foreach | fused |")
    print("|---|---|---|---|---|")
    for name, model in models.items():
        params = list(model.parameters())
        for param in params:
            param.grad = torch.randn_like(param)
        cells = []
        for options in ({}, {"foreach": True}, {"fused": True}):
            optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.98), **options)
            cells.append(f"{timed(optimizer.step, 10):.1f} ms")
        print(f"| {name} | {len(params)} | " + " | ".join(cells) + " |")


def linear_products(kind: str, rows: int, d_in: int, d_out: int) -> tuple[Callable, Callable]:
    """One float32 product of a linear layer, (on MKL, on oneDNN)."""
    x, weight, grad = torch.randn(rows, d_in), torch.randn(d_out, d_in), torch.randn(rows, d_out)
    if kind == "training input grad":  # (rows, out) @ (out, in)
        return lambda: grad @ weight, lambda: kernels._onednn_linear(grad, weight.t(), None)
    if kind == "training weight grad":  # (out, rows) @ (rows, in)
        return lambda: grad.t() @ x, lambda: kernels._onednn_linear(grad.t(), x.t(), None)
    if kind.startswith("decoding"):
        weight = weight.t().contiguous().t()
    return lambda: F.linear(x, weight), lambda: kernels._onednn_linear(x, weight, None)


def bench_linear() -> None:
    picked = "oneDNN" if kernels.onednn_float32_linear_is_faster() else "MKL"
    print(f"\n### float32 linear layers (GFLOP/s; this CPU picks {picked})\n")
    print("| product | rows x (in -> out) | MKL | oneDNN |\n|---|---|---|---|")
    cases = [("decoding, column-major weight", rows, d_in, d_out) for rows in (8, 40, 320)
             for d_in, d_out in ((256, 1024), (1024, 256), (256, 8000))]  # fmt: skip
    for kind in ("forward", "input grad", "weight grad"):
        cases.append((f"training {kind}", 2048, 256, 1024))
    for kind, rows, d_in, d_out in cases:
        flops = 2 * rows * d_in * d_out
        products = linear_products(kind, rows, d_in, d_out)
        cells = [f"{flops / timed(run, 20) / 1e6:.0f}" for run in products]
        print(f"| {kind} | {rows} x ({d_in} -> {d_out}) | " + " | ".join(cells) + " |")


GROUPS = {"dropout": bench_dropout, "attention": bench_attention, "loss": bench_loss}
GROUPS.update(adam=bench_adam, linear=bench_linear)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(GROUPS), help="comma-separated groups")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"threads {args.threads}, load {harness.load_average():.2f}, CPU class {hardware.cpu_class()}"
    )
    for name in args.only.split(","):
        GROUPS[name]()
    print(f"\nload average at the end: {harness.load_average():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
