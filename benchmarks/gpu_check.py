"""GPU readiness figures in one JSON: training throughput and MFU, compile on/off, beam decoding.

    python benchmarks/gpu_check.py                   # on a CUDA GPU: transformer_base, ~25k tokens
    python benchmarks/gpu_check.py --cpu             # the same steps at toy sizes, on the CPU

Called by ``benchmarks/gpu_check.sh``, which adds the CUDA test files and a ``torchrun`` run.
Training runs go through ``seq2seq``'s own model, loss, optimizer and scheduler, with the
precision handling of ``seq2seq.train`` (bf16 autocast; fp16 autocast with a ``GradScaler``).
Batches are random token ids at newstest-like lengths: throughput does not depend on the values.
MFU is model FLOPs (6 x non-embedding parameters x target tokens, plus attention) per second over
the best rate of a large matmul in the same precision, measured here at start-up.
Decoding uses untrained weights, so every output runs to the length limit (1.2 x source + 10):
the most work a sentence can cost.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext

import torch

from seq2seq.config import PRESETS, ModelConfig, TrainConfig
from seq2seq.loss import label_smoothed_nll
from seq2seq.model import build_model, count_parameters
from seq2seq.optim import build_optimizer, build_scheduler
from seq2seq.search import TransformerDecoder, beam_search
from seq2seq.tokenizer import BOS_ID, EOS_ID, PAD_ID


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int) -> float:
    """Best FLOP/s of an n x n x n matmul over a few windows."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = 0.0
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - start))
    return best


def random_batch(
    n_sentences: int, length: int, vocab: int, device: torch.device, generator: torch.Generator
):
    """Source, decoder input and output ids, (n, width) each; lengths (EOS included) vary +-30%."""
    lengths = torch.randint(
        int(0.7 * length), int(1.3 * length) + 1, (n_sentences,), generator=generator
    )
    width = int(lengths.max())
    tokens = torch.randint(4, vocab, (n_sentences, width), generator=generator)
    positions = torch.arange(width)[None, :]
    tokens = torch.where(positions < lengths[:, None], tokens, PAD_ID)
    tokens[torch.arange(n_sentences), lengths - 1] = EOS_ID
    tgt_in = torch.cat([torch.full((n_sentences, 1), BOS_ID), tokens[:, :-1]], dim=1)
    tgt_in = torch.where(tokens == PAD_ID, PAD_ID, tgt_in)
    return tokens.to(device), tgt_in.to(device), tokens.to(device)


def train_run(
    config: ModelConfig,
    vocab: int,
    precision: str,
    compile_model: bool,
    tokens_per_update: int,
    steps: int,
    warmup: int,
    device: torch.device,
) -> dict:
    torch.manual_seed(0)
    model = build_model(config, vocab, vocab).to(device)
    train_config = TrainConfig(lr=1.0, warmup_steps=4000, clip_norm=0.0, precision=precision)
    optimizer = build_optimizer(model, train_config)
    scheduler = build_scheduler(optimizer, train_config, config.d_model, 0)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    net = torch.compile(model) if compile_model else model
    generator = torch.Generator().manual_seed(0)
    length = 27  # newstest2014 en-de: ~27 subword tokens per sentence
    batch = random_batch(max(1, tokens_per_update // length), length, vocab, device, generator)
    n_tokens = int((batch[2] != PAD_ID).sum())
    losses, seconds = [], []
    compile_seconds = None
    for step in range(warmup + steps):
        synchronize(device)
        start = time.perf_counter()
        autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
        with autocast:
            logits = net(batch[0], batch[1])
            loss, _, _ = label_smoothed_nll(logits, batch[2], 0.1)
        scaler.scale(loss / n_tokens).backward()
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item() / n_tokens)
        synchronize(device)
        elapsed = time.perf_counter() - start
        if step == 0 and compile_model:
            compile_seconds = elapsed
        if step >= warmup:
            seconds.append(elapsed)
    embedding = model.target_embedding.weight.numel()
    layers = config.n_encoder_layers + config.n_decoder_layers
    flops_per_token = 6 * (count_parameters(model) - embedding) + 6 * embedding  # output layer
    flops_per_token += 12 * layers * config.d_model * length  # attention scores and sums
    step_seconds = sorted(seconds)[len(seconds) // 2]
    return {
        "precision": precision,
        "compile": compile_model,
        "tokens_per_update": n_tokens,
        "median_step_s": round(step_seconds, 4),
        "tgt_tok_s": round(n_tokens / step_seconds, 1),
        "flop_s": n_tokens * flops_per_token / step_seconds,
        "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4),
        "finite": all(x == x and abs(x) != float("inf") for x in losses),
        "grad_scale": scaler.get_scale() if scaler.is_enabled() else None,
        "compile_s": None if compile_seconds is None else round(compile_seconds, 1),
    }


def decode_run(
    config: ModelConfig,
    vocab: int,
    n_sentences: int,
    beam: int,
    precision: str,
    device: torch.device,
) -> dict:
    torch.manual_seed(0)
    model = build_model(config, vocab, vocab).to(device).eval()
    generator = torch.Generator().manual_seed(1)
    src, _, _ = random_batch(n_sentences, 27, vocab, device, generator)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    batch_size = 128 if device.type == "cuda" else 16
    synchronize(device)
    start = time.perf_counter()
    produced = 0
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    with torch.inference_mode(), autocast:
        for first in range(0, n_sentences, batch_size):
            chunk = src[first : first + batch_size]
            lengths = (chunk != PAD_ID).sum(dim=1)
            max_len = (1.2 * lengths + 10).long().clamp(1, config.max_positions)
            hypotheses = beam_search(TransformerDecoder(model, chunk), len(chunk), beam, max_len)
            produced += sum(len(h[0].tokens) for h in hypotheses)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "beam": beam,
        "precision": precision,
        "sentences": n_sentences,
        "sentences_s": round(n_sentences / seconds, 1),
        "tgt_tok_s": round(produced / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="toy sizes on the CPU (a dry run)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    if args.cpu:
        device = torch.device("cpu")
        config = ModelConfig(**{**PRESETS["transformer_tiny"], "dropout": 0.0})
        vocab, tokens, steps, warmup, sentences, peak_n = 500, 2000, args.steps or 3, 1, 24, 512
        precisions = ("bf16", "fp16")  # fp16 on CPU only exercises the scaler's logic
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device; use --cpu for the dry run", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        config = ModelConfig(**{**PRESETS["transformer_base"], "dropout": 0.0})
        vocab, tokens, steps, warmup, sentences, peak_n = (
            37000,
            25000,
            args.steps or 20,
            5,
            3003,
            8192,
        )
        precisions = ("bf16", "fp16")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = {
        p: matmul_peak(d, device, peak_n)
        for p, d in (("bf16", torch.bfloat16), ("fp16", torch.float16))
    }
    summary: dict = {
        "device": name,
        "torch": torch.__version__,
        "model": "transformer_tiny" if args.cpu else "transformer_base",
        "matmul_peak_tflop_s": {p: round(v / 1e12, 3) for p, v in peaks.items()},
        "train": [],
        "decode": [],
    }
    for precision in precisions:
        # On the CPU dry run compiling costs seconds a model, so only the first precision compiles.
        compiles = (False, True) if not args.cpu or precision == precisions[0] else (False,)
        for compile_model in compiles:
            result = train_run(
                config, vocab, precision, compile_model, tokens, steps, warmup, device
            )
            result["mfu"] = round(result.pop("flop_s") / peaks[precision], 4)
            summary["train"].append(result)
            print(f"gpu_check: train {result}", file=sys.stderr, flush=True)
    # Without dropout the compiled model must compute the eager model's first loss (same weights,
    # same batch) up to the precision's rounding: a wrong graph shows up here.
    eager = {r["precision"]: r["first_loss"] for r in summary["train"] if not r["compile"]}
    summary["compile_matches_eager"] = all(
        abs(r["first_loss"] - eager[r["precision"]]) <= 1e-2 * abs(eager[r["precision"]])
        for r in summary["train"]
        if r["compile"]
    )
    summary["decode"].append(
        decode_run(config, vocab, sentences, 4, "fp32" if args.cpu else "bf16", device)
    )
    print(json.dumps(summary, indent=2))
    healthy = all(r["finite"] for r in summary["train"]) and summary["compile_matches_eager"]
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
