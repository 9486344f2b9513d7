"""The training loop: token-budget batches, accumulation, autocast, clipping, DDP, eval, exact resume.

    seq2seq train recipes/configs/multi30k.yaml train.max_steps=2000
    torchrun --nproc_per_node 4 -m seq2seq.train CONFIG.yaml          # data parallel

One update consumes ``world_size * update_freq`` consecutive batches of the epoch's deterministic
batch list (``data.batch_indices(seed, epoch)``); rank ``r`` takes those whose index is ``r`` modulo
the world size. The loss is summed over target tokens, and gradients are divided by the number of
target tokens in the whole update (all ranks, all micro-batches), so N processes compute exactly
what one process with ``update_freq * N`` computes on the same batches.

Checkpoints (``<out_dir>/checkpoints/step_<n>``) hold the weights, config, tokenizer and everything
needed to continue bit-for-bit: optimizer, scheduler, grad scaler, counters, the position in the
epoch's batch list and every rank's RNG states. A run restarted with the same ``out_dir`` resumes.
``last`` and ``best`` in that folder point at the newest and the best (``train.best_metric``).

A decoder-only run (``model.arch=gpt``, ``data.format=lm``) draws random blocks with a saved
``torch.Generator`` instead of walking epochs, and validates on fixed ``lm_eval_batches``.
Training stops at ``max_steps``, ``max_epochs``, ``max_minutes``, after ``patience`` evaluations
without improvement, or on SIGINT/SIGTERM (the update in flight is finished and saved first).
Losses are reported per target token in nats; ``ppl = exp(nll)``.

Faults: an update whose loss is NaN/Inf is skipped and counted (under fp16 the grad scaler also
lowers its scale), and ``MAX_NONFINITE_IN_A_ROW`` of them stop the run. A
``torch.OutOfMemoryError`` in a forward/backward skips that update (gradients zeroed, CUDA cache
emptied, a warning printed) and ``MAX_OOM_IN_A_ROW`` of them stop the run; with several processes
an OOM is re-raised, since the other ranks would wait forever in the gradient all-reduce.
``train.deterministic=true`` turns on ``torch.use_deterministic_algorithms``, sets
``cudnn.deterministic`` (and turns ``cudnn.benchmark`` off) and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
(which cuBLAS needs for reproducible matmuls on GPU); on CPU the same seed and config give
bit-identical weights without it.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import sacrebleu
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from seq2seq import distributed
from seq2seq.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_resume_checkpoint,
    load_trainer_state,
    load_weights,
    restore_rng_state,
    save_training_checkpoint,
)
from seq2seq.config import ConfigError, RunConfig, TrainConfig, load_config, save_config
from seq2seq.data import (
    Batch,
    DataError,
    LMCorpus,
    TokenizedCorpus,
    batch_indices,
    collate,
    lm_batch,
    lm_eval_batches,
    prepare,
)
from seq2seq.loss import label_smoothed_nll
from seq2seq.model import build_model, count_parameters
from seq2seq.optim import build_optimizer, build_scheduler
from seq2seq.search import TransformerDecoder, greedy
from seq2seq.tokenizer import PAD_ID, Tokenizer, TokenizerError

MAX_NONFINITE_IN_A_ROW = 5
MAX_OOM_IN_A_ROW = 3
BLEU_BATCH_SENTENCES = 64


def train(config: RunConfig) -> dict[str, float]:
    """Train (or resume) the run that ``config`` describes; see the module docstring.

    Returns:
        Final metrics: ``step``, ``epoch``, ``train_loss``, ``valid_loss``, ``valid_nll``,
        ``valid_ppl``, ``best``, ``bleu`` (when evaluated), ``nonfinite_updates``, ``oom_skipped``.
    """
    info = distributed.setup(config.train.device)
    try:
        return _train(config, info)
    finally:
        distributed.teardown()


def _train(config: RunConfig, info: distributed.DistInfo) -> dict[str, float]:
    tc, device = config.train, info.device
    _check_settings(config, device)
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tc.tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tc.tf32
    if tc.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for that
    torch.use_deterministic_algorithms(tc.deterministic)
    torch.backends.cudnn.deterministic = tc.deterministic
    torch.backends.cudnn.benchmark = False
    _seed_everything(tc.seed + info.rank)
    out_dir = Path(tc.out_dir)
    log = print if info.is_main else (lambda *args, **kwargs: None)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
        save_config(config, out_dir / "config.yaml")
        prepare(config)  # idempotent; one process writes, the others wait at the barrier
    distributed.barrier()
    prepared = config.prepared_dir()
    tokenizer = Tokenizer.load(prepared / "tokenizer")

    model = build_model(config.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    model.to(device)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc, config.model.d_model, tc.max_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    lm_mode = config.model.arch in ("gpt", "bigram")
    generator = torch.Generator().manual_seed(tc.seed + info.rank)
    state: dict[str, Any] = {
        "step": 0,
        "epoch": 1,
        "position": 0,
        "epoch_done": False,
        "best": None,
        "bad_evals": 0,
    }

    resume_dir = find_resume_checkpoint(out_dir)
    if resume_dir is not None:
        saved = load_trainer_state(resume_dir)
        load_weights(model, resume_dir)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state.update(saved["counters"])
        if len(saved["rng"]) == info.world_size:
            restore_rng_state(saved["rng"][info.rank]["global"])
            generator.set_state(saved["rng"][info.rank]["lm"])
        else:  # a different world size cannot replay the old streams; start fresh ones
            _seed_everything(tc.seed + info.rank + 1000 * state["step"])
        log(f"resumed from {resume_dir} at update {state['step']}")

    forward_model: nn.Module = torch.compile(model) if tc.compile else model
    net = forward_model
    if info.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(forward_model, device_ids=device_ids)
    log(f"model: {count_parameters(model):,} parameters on {device} x{info.world_size}")

    if lm_mode:
        train_corpus = LMCorpus(prepared, config.data.train_split)
        valid_corpus = LMCorpus(prepared, config.data.valid_split)
        updates = _lm_updates(train_corpus, config, generator)
    else:
        train_corpus = TokenizedCorpus(prepared, config.data.train_split)
        valid_corpus = TokenizedCorpus(prepared, config.data.valid_split)
        updates = _seq2seq_updates(train_corpus, config, info, state["epoch"], state["position"])

    writer = None
    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter  # slow import; rank 0 only

        writer = SummaryWriter(str(out_dir / "tensorboard"))
    stop_signal = threading.Event()
    previous_handlers = _install_signal_handlers(stop_signal)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[tc.precision]
    start = time.monotonic()
    window = {"loss": 0.0, "nll": 0.0, "tokens": 0.0, "time": start, "updates": 0}
    metrics: dict[str, float] = {}
    nonfinite, nonfinite_in_a_row, logged_loss = 0, 0, math.nan
    oom_skipped, oom_in_a_row = 0, 0
    stop = _finished(state, tc)  # a resumed run may already be complete
    params, keep = list(model.parameters()), tc.keep_last
    try:
        # -------------------------------------------------------------- the loop, one update a turn
        while not stop:
            epoch, position, epoch_done, batches = next(updates)
            state.update(epoch=epoch, position=position, epoch_done=epoch_done)
            net.train()
            loss_sum = torch.zeros((), device=device)
            nll_sum = torch.zeros((), device=device)
            try:
                for i, batch in enumerate(batches):
                    batch = batch.to(device)
                    # Gradients are all-reduced only after the last micro-batch of the update.
                    last = i == len(batches) - 1
                    with net.no_sync() if info.world_size > 1 and not last else nullcontext():
                        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                            logits = _forward(net, batch)
                            loss, nll, _ = label_smoothed_nll(
                                logits, batch.tgt_out, tc.label_smoothing
                            )
                        scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                    nll_sum += nll.detach()
            except torch.OutOfMemoryError:
                if info.world_size > 1:
                    raise
                logits = loss = nll = None  # free the graph before retrying with the next batch
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                oom_skipped, oom_in_a_row = oom_skipped + 1, oom_in_a_row + 1
                shape = tuple(batch.tgt_in.shape)
                print(
                    f"warning: update {state['step'] + 1}: out of memory (target batch {shape}); "
                    f"update skipped ({oom_skipped} so far); consider lowering data.max_tokens",
                    file=sys.stderr,
                    flush=True,
                )
                if oom_in_a_row >= MAX_OOM_IN_A_ROW:
                    stop = f"{oom_in_a_row} out-of-memory errors in a row"
                continue
            oom_in_a_row = 0
            n_tokens = sum(batch.n_tgt_tokens for batch in batches)
            time_up = tc.max_minutes > 0 and time.monotonic() - start > tc.max_minutes * 60
            stop_vote = float(stop_signal.is_set() or time_up)
            total_tokens, total_loss, total_nll, stop_votes = distributed.all_reduce_sum(
                [n_tokens, loss_sum.item(), nll_sum.item(), stop_vote]
            )
            if not math.isfinite(total_loss):
                if scaler.is_enabled():  # fp16: let the scaler see the overflow and back off
                    scaler.unscale_(optimizer)
                    scaler.step(optimizer)
                    scaler.update()
                optimizer.zero_grad(set_to_none=True)
                nonfinite, nonfinite_in_a_row = nonfinite + 1, nonfinite_in_a_row + 1
                log(f"update {state['step'] + 1}: non-finite loss, skipped ({nonfinite} so far)")
                if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                    stop = f"{nonfinite_in_a_row} non-finite losses in a row"
                continue
            nonfinite_in_a_row = 0
            scaler.unscale_(optimizer)
            # DDP averaged gradients over ranks; make them sum / (target tokens in the update).
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_mul_(grads, info.world_size / total_tokens)
            max_norm = tc.clip_norm if tc.clip_norm > 0 else math.inf
            grad_norm = float(nn.utils.clip_grad_norm_(params, max_norm))
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = state["step"] + 1
            for key, value in (("loss", total_loss), ("nll", total_nll), ("tokens", total_tokens)):
                window[key] += value
            window["updates"] += 1

            if info.is_main and tc.log_every and step % tc.log_every == 0:
                logged_loss = _log_train(window, step, epoch, lr, grad_norm, start, tc, writer)
            stop = _finished(state, tc) or ("stop requested (signal or time)" if stop_votes else "")
            evaluate_now = step % tc.eval_every == 0 if tc.eval_every else epoch_done
            paused = time.monotonic()  # evaluation and saving do not count towards tokens/s
            improved = False
            if evaluate_now or stop:
                metrics = _validate(model, forward_model, valid_corpus, config, info, tokenizer)
                improved = _update_best(state, metrics, tc.best_metric)
                _log_eval(metrics, state, step, writer, log)
                if tc.patience and state["bad_evals"] >= tc.patience and not stop:
                    stop = f"no improvement in {tc.patience} evaluations"
            save_now = step % tc.save_every == 0 if tc.save_every else evaluate_now
            if save_now or improved or stop:
                trainer_state = _trainer_state(state, optimizer, scheduler, scaler, generator)
                if info.is_main:
                    save_training_checkpoint(
                        out_dir, step, model, config, tokenizer, trainer_state, improved, keep
                    )
            window["time"] += time.monotonic() - paused
    finally:
        _restore_signal_handlers(previous_handlers)
        if writer is not None:
            writer.close()
    if not metrics:
        metrics = _validate(model, forward_model, valid_corpus, config, info, tokenizer)
    log(f"stopped at update {state['step']}: {stop}")
    return {
        "step": state["step"],
        "epoch": state["epoch"],
        "train_loss": window["loss"] / window["tokens"] if window["tokens"] else logged_loss,
        "best": state["best"],
        "nonfinite_updates": nonfinite,
        "oom_skipped": oom_skipped,
        **metrics,
    }


def _check_settings(config: RunConfig, device: torch.device) -> None:
    """Settings the config cannot check alone: they depend on the device or the data format."""
    if config.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs CUDA (loss scaling); use bf16 on CPU")
    if config.model.arch in ("gpt", "bigram") and (
        config.train.eval_every == 0 or config.train.max_epochs
    ):
        raise ConfigError(
            "language-model training draws random blocks and has no epochs: set "
            "train.eval_every > 0 and train.max_epochs = 0"
        )


def _forward(net: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits ``(b, t, v)``: encoder-decoder when the batch has a source, else decoder-only."""
    if batch.src is None:
        return net(batch.tgt_in)
    return net(batch.src, batch.tgt_in)


def _seq2seq_updates(
    corpus: TokenizedCorpus, config: RunConfig, info: distributed.DistInfo, epoch: int, done: int
) -> Iterator[tuple[int, int, bool, list[Batch]]]:
    """Yield ``(epoch, batches used in epoch, epoch finished, this rank's micro-batches)`` forever.

    Starts after the first ``done`` batches of ``epoch`` (resume; counted in batches so that a run
    resumed with another world size or update_freq skips no more than a partial update). The batch
    list is truncated to a multiple of ``world_size * update_freq`` so that every rank sees the
    same number of micro-batches.
    """
    group = info.world_size * config.train.update_freq
    while True:
        batches = batch_indices(corpus, config.data.max_tokens, config.train.seed, epoch)
        n_updates = len(batches) // group
        if n_updates == 0:
            raise ConfigError(
                f"{len(batches)} batches per epoch cannot feed one update of {group} batches "
                "(world_size x train.update_freq); lower data.max_tokens or update_freq"
            )
        for update in range(-(-done // group), n_updates):
            first = update * group
            mine = batches[first + info.rank : first + group : info.world_size]
            used = first + group
            yield epoch, used, update + 1 == n_updates, [collate(corpus, i) for i in mine]
        epoch, done = epoch + 1, 0


def _lm_updates(
    corpus: LMCorpus, config: RunConfig, generator: torch.Generator
) -> Iterator[tuple[int, int, bool, list[Batch]]]:
    """Random blocks from the token stream; the saved generator makes them replayable."""
    while True:
        batches = [
            lm_batch(corpus, config.data.block_size, config.data.batch_size, generator)
            for _ in range(config.train.update_freq)
        ]
        yield 1, 0, False, batches


@torch.no_grad()
def _validate(
    model: nn.Module,
    forward_model: nn.Module,
    corpus: TokenizedCorpus | LMCorpus,
    config: RunConfig,
    info: distributed.DistInfo,
    tokenizer: Tokenizer,
) -> dict[str, float]:
    """Loss, NLL and perplexity per target token over the validation split, summed over ranks."""
    model.eval()
    data, seed = config.data, config.train.seed
    if isinstance(corpus, LMCorpus):
        batches = lm_eval_batches(corpus, data.block_size, data.batch_size, data.eval_batches, seed)
    else:
        batches = [collate(corpus, i) for i in batch_indices(corpus, data.max_tokens, seed, 0)]
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.train.precision]
    epsilon = config.train.label_smoothing
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)
    for batch in batches[info.rank :: info.world_size]:
        batch = batch.to(info.device)
        with torch.autocast(info.device.type, dtype=dtype, enabled=dtype is not None):
            logits = _forward(forward_model, batch)
        loss, nll, n_tokens = label_smoothed_nll(logits, batch.tgt_out, epsilon)
        sums += torch.stack([loss, nll, n_tokens]).double()
    loss_sum, nll_sum, tokens = distributed.all_reduce_sum(sums).tolist()
    tokens = max(tokens, 1.0)
    metrics = {
        "valid_loss": loss_sum / tokens,
        "valid_nll": nll_sum / tokens,
        "valid_ppl": math.exp(min(nll_sum / tokens, 50.0)),
    }
    if config.train.eval_bleu and not isinstance(corpus, LMCorpus):
        metrics["bleu"] = _validation_bleu(model, corpus, config, info, tokenizer)
    return metrics


def _validation_bleu(
    model: nn.Module,
    corpus: TokenizedCorpus,
    config: RunConfig,
    info: distributed.DistInfo,
    tokenizer: Tokenizer,
) -> float:
    """Greedy-decode the first ``train.eval_bleu_sentences`` validation sources; sacreBLEU.

    References are the prepared target ids decoded back to text (the examples that survived the
    length filter), so the score tracks progress but is not the final test-set number.
    """
    n_sentences = min(len(corpus), config.train.eval_bleu_sentences)
    mine = np.arange(n_sentences)[info.rank :: info.world_size]
    mine = mine[np.argsort(corpus.src_lengths[mine], kind="stable")]  # less padding per batch
    pairs = []
    for chunk in np.array_split(mine, max(1, math.ceil(len(mine) / BLEU_BATCH_SENTENCES))):
        if len(chunk) == 0:
            continue
        src = collate(corpus, chunk).src.to(info.device)
        src_lengths = (src != PAD_ID).sum(dim=1)
        max_len = (config.decode.max_len_a * src_lengths + config.decode.max_len_b).long()
        max_len = max_len.clamp(1, config.model.max_positions)
        hypotheses = greedy(TransformerDecoder(model, src), len(chunk), max_len)
        for index, hypothesis in zip(chunk.tolist(), hypotheses):
            reference = tokenizer.decode_target(corpus.target(index).tolist())
            pairs.append((index, tokenizer.decode_target(hypothesis.tokens), reference))
    gathered = sorted(p for part in distributed.all_gather_objects(pairs) for p in part)
    hypotheses = [hypothesis for _, hypothesis, _ in gathered]
    references = [reference for _, _, reference in gathered]
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def _finished(state: dict[str, Any], tc: TrainConfig) -> str:
    """Why training is complete at this point, or "" to go on."""
    if tc.max_steps and state["step"] >= tc.max_steps:
        return f"reached train.max_steps={tc.max_steps}"
    if tc.max_epochs and state["epoch_done"] and state["epoch"] >= tc.max_epochs:
        return f"reached train.max_epochs={tc.max_epochs}"
    return ""


def _update_best(state: dict[str, Any], metrics: dict[str, float], best_metric: str) -> bool:
    """Record an improvement of ``best_metric`` (lower loss, higher BLEU); count the misses."""
    value = metrics["valid_loss"] if best_metric == "valid_loss" else metrics["bleu"]
    best = state["best"]
    better = best is None or (value < best if best_metric == "valid_loss" else value > best)
    if better:
        state["best"], state["bad_evals"] = value, 0
    else:
        state["bad_evals"] += 1
    return better


def _trainer_state(
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Everything besides the weights that an exact resume needs; gathers every rank's RNGs."""
    rng = {"global": capture_rng_state(), "lm": generator.get_state()}
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "counters": dict(state),
        "rng": distributed.all_gather_objects(rng),
    }


def _log_train(window, step, epoch, lr, grad_norm, start, tc, writer) -> float:
    now = time.monotonic()
    tokens = max(window["tokens"], 1.0)
    loss, nll = window["loss"] / tokens, window["nll"] / tokens
    speed = window["tokens"] / max(now - window["time"], 1e-9)
    seconds_per_update = (now - window["time"]) / max(window["updates"], 1)
    remaining = []
    if tc.max_steps:
        remaining.append((tc.max_steps - step) * seconds_per_update)
    if tc.max_minutes:
        remaining.append(tc.max_minutes * 60 - (now - start))
    eta = f" | eta {_duration(min(remaining))}" if remaining else ""
    print(
        f"update {step} | epoch {epoch} | loss {loss:.3f} | nll {nll:.3f} | "
        f"ppl {math.exp(min(nll, 50.0)):.2f} | lr {lr:.3g} | gnorm {grad_norm:.3f} | "
        f"{speed:,.0f} tok/s{eta}",
        flush=True,
    )
    if writer is not None:
        scalars = {"loss": loss, "nll": nll, "lr": lr, "grad_norm": grad_norm, "tok_per_s": speed}
        for name, value in scalars.items():
            writer.add_scalar(f"train/{name}", value, step)
    window.update(loss=0.0, nll=0.0, tokens=0.0, time=now, updates=0)
    return loss


def _log_eval(metrics, state, step, writer, log) -> None:
    text = " | ".join(f"{name} {value:.3f}" for name, value in metrics.items())
    log(f"update {step} | valid | {text} | best {state['best']:.3f}", flush=True)
    if writer is not None:
        for name, value in metrics.items():
            writer.add_scalar(f"valid/{name.removeprefix('valid_')}", value, step)


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _install_signal_handlers(stop: threading.Event) -> dict[int, Any]:
    """First SIGINT/SIGTERM sets ``stop`` (the loop finishes the update, saves, exits); a second
    one interrupts at once."""

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        print(f"signal {signum}: finishing this update, then saving and stopping", flush=True)

    if threading.current_thread() is not threading.main_thread():
        return {}  # signal handlers can only be installed from the main thread
    return {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    """``seq2seq train CONFIG.yaml [section.key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="seq2seq train", description="Train a model; rerun with the same out_dir to resume."
    )
    parser.add_argument("config", help="YAML run config (see seq2seq/config.py)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    try:
        metrics = train(load_config(args.config, args.overrides))
    except (ConfigError, DataError, TokenizerError, CheckpointError) as error:
        print(f"seq2seq train: error: {error}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # the process group is gone by now
        print(
            " | ".join(f"{key} {value:.4g}" for key, value in metrics.items() if value is not None)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
