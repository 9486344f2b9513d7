"""Training throughput: our Transformer against Hugging Face ``MarianMTModel``, same batches.

    python benchmarks/bench_train.py                       # transformer_small + base, fp32 + auto
    python benchmarks/bench_train.py --configs transformer_small --precisions bf16 --steps 20
    python benchmarks/bench_train.py --profile --configs transformer_small --precisions bf16

Our training step is ``seq2seq.train.train_step`` itself (the update the trainer runs): forward
under autocast, label-smoothed loss (``seq2seq.loss.label_smoothed_nll``, eps 0.1), backward,
gradients scaled by 1 / target tokens, clipping at ``train.clip_norm``, Adam step
(``seq2seq.optim``), schedule step, zero grad. The Hugging
Face step is what ``Seq2SeqTrainer`` runs with ``label_smoothing_factor=0.1``: its
``LabelSmoother`` on the logits (labels padded with -100), backward, clipping at norm 1, and its
default optimizer (``adamw_torch_fused``: fused AdamW, weight decay 0) with the same betas, eps and
schedule. The batches
are the first ``warmup + steps`` token-budget batches (4,096 tokens) of Multi30k's training set
with a joint 8k BPE vocabulary, identical for both implementations. The Marian model is
``seq2seq.export.to_marian`` of ours, so it starts from the same weights with the same sizes
(post-norm, sinusoids, ReLU, three-way tied embeddings) and trains with the same loss and
optimizer settings; the network, the loss code and the optimizer code are each side's own. Each
(implementation, config, precision) runs in its own process (peak RSS is per run); ours and
Hugging Face alternate. Ours runs in the process the ``seq2seq`` command gives it (tcmalloc where
installed, see ``seq2seq/__main__.py``; ``SEQ2SEQ_ALLOCATOR=system`` keeps glibc's), Hugging Face
in a plain Python process, as a ``transformers`` user's training script runs.

FLOPs are counted analytically from the padded batch shapes (matmuls only; a multiply-add is 2):

    forward = sum over encoder layers  b*s*(8m^2 + 4mf) + 4*b*s^2*m
            + sum over decoder layers  b*t*(8m^2 + 4mf) + 4*b*t^2*m          (self-attention, FFN)
                                     + b*t*4m^2 + b*s*4m^2 + 4*b*t*s*m       (cross-attention)
            + 2*b*t*m*v                                                      (output projection)
    training step = 3 * forward   (the backward pass costs two forward passes)

i.e. 6 x (matmul parameters) x tokens plus the attention score/value products (counted in full,
as the kernels compute them, causal or not). MFU divides the achieved FLOP/s by the peak of a
large square matmul in the run's precision, measured by this script at start-up.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from seq2seq import distributed, train  # noqa: E402
from seq2seq.config import PRESETS, ModelConfig, load_config  # noqa: E402
from seq2seq.data import Batch, TokenizedCorpus, batch_indices, collate  # noqa: E402
from seq2seq.export import to_marian  # noqa: E402
from seq2seq.hardware import resolve_precision  # noqa: E402
from seq2seq.loss import label_smoothed_nll  # noqa: E402
from seq2seq.model import build_model  # noqa: E402
from seq2seq.optim import build_scheduler  # noqa: E402
from seq2seq.prepare import prepare  # noqa: E402
from seq2seq.tokenizer import PAD_ID, Tokenizer  # noqa: E402

CONFIGS = ("transformer_small", "transformer_base")
PRECISIONS = ("fp32", "auto")
IMPLS = ("ours", "hf")


def forward_flops(model: ModelConfig, vocab: int, b: int, s: int, t: int) -> int:
    """Matmul FLOPs of one teacher-forced forward pass on a (b, s) source and (b, t) target."""
    m, f = model.d_model, model.d_ff
    encoder = b * s * (8 * m * m + 4 * m * f) + 4 * b * s * s * m
    decoder = b * t * (8 * m * m + 4 * m * f) + 4 * b * t * t * m
    cross = b * t * 4 * m * m + b * s * 4 * m * m + 4 * b * t * s * m
    output = 2 * b * t * m * vocab
    return model.n_encoder_layers * encoder + model.n_decoder_layers * (decoder + cross) + output


def train_step_flops(model: ModelConfig, vocab: int, batch: Batch) -> int:
    b, s = batch.src.shape
    return 3 * forward_flops(model, vocab, b, s, batch.tgt_in.shape[1])


# ----------------------------------------------------------------------------- worker


def _worker(settings: dict[str, Any]) -> None:
    torch.set_num_threads(settings["threads"])
    torch.manual_seed(settings["seed"])
    root = Path(settings["data"])
    overrides = harness.multi30k_overrides(root) + [
        f"model.preset={settings['config']}",
        f"train.precision={settings['precision']}",
        f"train.seed={settings['seed']}",
    ]
    config = load_config(harness.MULTI30K_CONFIG, overrides)
    prepared = config.prepared_dir()
    tokenizer = Tokenizer.load(prepared / "tokenizer")
    corpus = TokenizedCorpus(prepared, config.data.train_split)
    n_batches = settings["warmup"] + settings["steps"]
    order = batch_indices(corpus, config.batch.max_tokens, config.train.seed, epoch=1)
    batches = [collate(corpus, indices) for indices in order[:n_batches]]

    ours = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    if settings["impl"] == "ours":
        network: nn.Module = ours

        def forward(batch: Batch) -> torch.Tensor:
            return network(batch.src, batch.tgt_in)

    else:
        network = to_marian(ours)
        del ours

        def forward(batch: Batch) -> torch.Tensor:
            return network(
                input_ids=batch.src,
                attention_mask=batch.src != PAD_ID,
                decoder_input_ids=batch.tgt_in,
                use_cache=False,
            ).logits

    tc = config.train
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.precision == "bf16")
    if settings["impl"] == "ours":
        # The real update of seq2seq.train (world-size factor, NaN skip, clip guard included).
        cpu = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        run = train.build_run(config, cpu, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
        run.model.load_state_dict(network.state_dict())
        network = run.model

        def step(batch: Batch) -> float:
            result = train.train_step(run, [batch])
            return result.loss / result.tokens

    else:
        # What Seq2SeqTrainer runs: its LabelSmoother on labels padded with -100, the mean over
        # tokens, and its default optimizer (``adamw_torch_fused``) with weight decay 0.
        from transformers.trainer_pt_utils import LabelSmoother

        smoother = LabelSmoother(epsilon=tc.label_smoothing)
        params = list(network.parameters())
        optimizer = torch.optim.AdamW(
            params, lr=tc.lr, betas=tuple(tc.adam_betas), eps=tc.adam_eps, weight_decay=0.0,
            fused=True,
        )  # fmt: skip
        scheduler = build_scheduler(optimizer, tc, config.model.d_model, tc.max_steps)

        def step(batch: Batch) -> float:
            labels = batch.tgt_out.masked_fill(batch.tgt_out == PAD_ID, -100)
            with autocast:
                loss = smoother({"logits": forward(batch)}, labels)
            loss.backward()
            nn.utils.clip_grad_norm_(params, tc.clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

    network.eval()
    with torch.no_grad(), autocast:
        eval_loss, _, eval_tokens = label_smoothed_nll(
            forward(batches[0]), batches[0].tgt_out, tc.label_smoothing
        )
    network.train()

    for batch in batches[: settings["warmup"]]:
        step(batch)
    measured = batches[settings["warmup"] :]
    if settings.get("profile"):
        _profile(step, measured, settings)
        return
    times, losses = [], []
    for batch in measured:
        start = time.perf_counter()
        losses.append(step(batch))
        times.append(time.perf_counter() - start)
    seconds = sum(times)
    vocab = tokenizer.tgt_vocab_size
    flops = sum(train_step_flops(config.model, vocab, b) for b in measured)
    harness.report(
        {
            **{k: settings[k] for k in ("impl", "config", "precision")},
            "tgt_tok_s": sum(b.n_tgt_tokens for b in measured) / seconds,
            "src_tok_s": sum(b.n_src_tokens for b in measured) / seconds,
            "step_ms_median": 1000 * statistics.median(times),
            "flop_s": flops / seconds,
            "eval_loss_first_batch": float(eval_loss) / float(eval_tokens),
            "last_train_loss": losses[-1],
            "attention": getattr(getattr(network, "config", None), "_attn_implementation", "sdpa"),
            "load": round(harness.load_average(), 2),
        }
    )


def _profile(step, batches: list[Batch], settings: dict[str, Any]) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[: settings.get("rows", 25)]
    name = f"{settings['impl']} {settings['config']} {settings['precision']}"
    print(f"\n### profile: {name}, {len(batches)} steps, self CPU time by op\n")
    print("| op | self CPU ms / step | share | calls / step |")
    print("|---|---|---|---|")
    for event in top:
        per_step = event.self_cpu_time_total / 1000 / len(batches)
        print(
            f"| {event.key} | {per_step:.1f} | {100 * event.self_cpu_time_total / total:.1f}% "
            f"| {event.count / len(batches):.0f} |"
        )
    harness.report({"impl": settings["impl"], "profiled": True})


# ----------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    parser = harness.parser(__doc__)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated presets")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="fp32,bf16,auto")
    parser.add_argument("--impls", default=",".join(IMPLS), help="ours,hf")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (best is kept)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler op tables")
    args = parser.parse_args(argv)
    if harness.ran_as_worker(args, _worker):
        return 0

    root = harness.data_root(args.data)
    config = load_config(harness.MULTI30K_CONFIG, harness.multi30k_overrides(root))
    prepare(config)
    torch.set_num_threads(args.threads)
    info = harness.machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    peaks = {}
    if not args.profile:
        peaks = {
            "fp32": harness.matmul_peak(torch.float32),
            "bf16": harness.matmul_peak(torch.bfloat16),
        }
        print(
            f"matmul peak (2048^3, {args.threads} threads): fp32 {peaks['fp32'] / 1e9:.0f} "
            f"GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s",
            flush=True,
        )
    impls = args.impls.split(",")
    rows, raw = [], []
    for name in args.configs.split(","):
        for requested in args.precisions.split(","):
            # "auto" runs what the library resolves on this CPU (bf16 only where it is native);
            # HF gets the same precision, so the ratio compares like with like.
            width = ModelConfig(**PRESETS[name]).d_model
            precision = resolve_precision(requested, "cpu", width).precision
            label = f"auto -> {precision}" if requested == "auto" else precision
            best: dict[str, dict[str, Any]] = {}
            for repeat in range(args.repeats):
                order = impls if repeat % 2 == 0 else impls[::-1]  # alternate who goes first
                for impl in order:
                    settings = dict(
                        impl=impl, config=name, precision=precision, steps=args.steps,
                        warmup=args.warmup, threads=args.threads, seed=args.seed,
                        data=str(root), profile=args.profile,
                    )  # fmt: skip
                    result = harness.run_worker(Path(__file__), settings, as_cli=impl == "ours")
                    raw.append(result)
                    if "error" in result or args.profile:
                        continue
                    result["mfu"] = result["flop_s"] / peaks[precision]
                    print(
                        f"{impl:>4} {name} {label}: {result['tgt_tok_s']:,.0f} tgt tok/s, "
                        f"{result['src_tok_s']:,.0f} src tok/s, MFU {100 * result['mfu']:.1f}%, "
                        f"max RSS {result['max_rss_mib']:,.0f} MiB, load {result['load']}",
                        flush=True,
                    )
                    if result["tgt_tok_s"] > best.get(impl, {}).get("tgt_tok_s", 0.0):
                        best[impl] = result
            if args.profile or set(best) != set(impls):
                continue
            row = {"config": name, "precision": label}
            for impl in impls:
                r = best[impl]
                row[f"{impl}_tgt"], row[f"{impl}_src"] = r["tgt_tok_s"], r["src_tok_s"]
                row[f"{impl}_mfu"] = f"{100 * r['mfu']:.1f}%"
                row[f"{impl}_rss"] = r["max_rss_mib"]
            if {"ours", "hf"} <= set(impls):
                row["ratio"] = f"{best['ours']['tgt_tok_s'] / best['hf']['tgt_tok_s']:.2f}x"
                row["loss0"] = (
                    f"{best['ours']['eval_loss_first_batch']:.4f} / "
                    f"{best['hf']['eval_loss_first_batch']:.4f}"
                )
            rows.append(row)
    if rows:
        columns = [("config", "config"), ("precision", "precision")]
        columns += harness.per_implementation(
            impls,
            [("tgt", "tgt tok/s"), ("src", "src tok/s"), ("mfu", "MFU"), ("rss", "max RSS MiB")],
        )
        columns += [("ratio", "ours/HF"), ("loss0", "eval loss batch 1 (ours / HF)")]
        print()
        print(harness.table(rows, columns))
        print(f"\nload average at the end: {harness.load_average():.2f}")
    if args.json:
        payload = {"machine": info, "peaks": peaks, "args": vars(args), "runs": raw}
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
