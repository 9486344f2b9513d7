"""The training loop: token-budget batches, accumulation, autocast, clipping, DDP, eval, exact resume.

    seq2seq train recipes/configs/multi30k.yaml train.max_steps=2000
    torchrun --nproc_per_node 4 -m seq2seq.train CONFIG.yaml          # data parallel
    seq2seq train CONFIG.yaml train.processes=2                       # the same, launched for you

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
without improvement, or on SIGINT/SIGTERM (the update in flight is finished and saved first, with
no extra evaluation, so that ``best`` and the patience count resume exactly as if uninterrupted).
``max_minutes`` is the run's budget, not the process's: the time trained so far is saved in each
checkpoint (``counters.elapsed_seconds``) and a resume spends only what is left.

Run directory guards (``seq2seq.rundir``): one process trains in an ``out_dir`` at a time
(``<out_dir>/.lock``); a resume stops when checkpoints exist but none loads (``train.resume``) or
when the config differs from the checkpoint's in what defines the run
(``train.allow_config_change``).
Losses are reported per target token in nats; ``ppl = exp(nll)``.

Faults: an update whose loss is NaN/Inf is skipped and counted (under fp16 the grad scaler also
lowers its scale), and ``MAX_NONFINITE_IN_A_ROW`` of them stop the run. A
``torch.OutOfMemoryError`` in a forward/backward skips that update (gradients zeroed, CUDA cache
emptied, a warning printed) and ``MAX_OOM_IN_A_ROW`` of them stop the run; with several processes
an OOM is re-raised, since the other ranks would wait forever in the gradient all-reduce.
For the run only (``train()`` puts the previous process-wide settings back when it returns),
``train.num_threads`` sets torch's intra-op threads and
``train.deterministic=true`` turns on ``torch.use_deterministic_algorithms``, sets
``cudnn.deterministic`` (and turns ``cudnn.benchmark`` off) and ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
(which cuBLAS needs for reproducible matmuls on GPU); on CPU the same seed and config give
bit-identical weights without it.
"""

from __future__ import annotations

import argparse
import enum
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from seq2seq import distributed, rundir
from seq2seq.checkpoint import CheckpointError, capture_rng_state, save_training_checkpoint
from seq2seq.config import ConfigError, RunConfig, load_config
from seq2seq.data import (
    Batch,
    DataError,
    LMCorpus,
    TokenizedCorpus,
    batch_indices,
    collate,
    lm_batch,
)
from seq2seq.kernels import float32_linear
from seq2seq.loss import label_smoothed_nll
from seq2seq.optim import apply_cooldown, cooldown_factor
from seq2seq.stopping import STOP_REQUESTED, finished, stop_requests, update_best
from seq2seq.tokenizer import TokenizerError
from seq2seq.trainlog import TrainLog
from seq2seq.trainsetup import (  # setup and build_run are part of this module's API
    Progress,
    Run,
    build_run,
    check_settings,
    resolve_train_precision,
    setup,
    torch_settings,
)
from seq2seq.validate import forward as _forward  # a module global: tests wrap it
from seq2seq.validate import validation_batches, validation_bleu, validation_loss

MAX_NONFINITE_IN_A_ROW = 5
MAX_OOM_IN_A_ROW = 3

__all__ = [
    "Progress", "Run", "StepResult", "build_run", "main", "resolve_train_precision", "setup",
    "torch_settings", "train", "train_step",
]  # fmt: skip


@dataclass
class Faults:
    """Skipped updates; not saved (a resumed run counts afresh)."""

    nonfinite: int = 0
    nonfinite_in_a_row: int = 0
    oom: int = 0
    oom_in_a_row: int = 0


class Outcome(enum.Enum):
    UPDATED = "updated"
    OUT_OF_MEMORY = "out of memory"
    NON_FINITE = "non-finite loss"


@dataclass(frozen=True)
class StepResult:
    """What one :func:`train_step` did; sums are over all ranks and micro-batches."""

    outcome: Outcome
    loss: float = math.nan  # label-smoothed loss summed over target tokens
    nll: float = math.nan
    tokens: float = 0.0  # target tokens in the update
    grad_norm: float = math.nan  # before clipping
    lr: float = math.nan  # the rate this update used
    votes: tuple[float, ...] = ()  # the caller's votes, summed over ranks
    batch_shape: tuple[int, ...] = ()  # the target batch that ran out of memory


def train(config: RunConfig) -> dict[str, float]:
    """Train (or resume) the run that ``config`` describes; see the module docstring.

    Process-wide torch settings (threads, deterministic algorithms, cuDNN flags) are applied for
    the run and restored when it returns.

    Returns:
        Final metrics: ``step``, ``epoch``, ``train_loss``, ``valid_loss``, ``valid_nll``,
        ``valid_ppl``, ``best``, ``bleu`` (when evaluated), ``nonfinite_updates``, ``oom_skipped``,
        ``train_seconds``.
    """
    info = distributed.setup(config.train.device)
    try:
        check_settings(config, info.device)  # before the lock creates out_dir
        run_lock = rundir.locked(config.train.out_dir) if info.is_main else nullcontext()
        with torch_settings(config.train, info.device), run_lock:
            metrics = _loop(setup(config, info))
        # Every rank leaves the group together, none while a peer still writes the final
        # checkpoint (how the other ranks then exit: main()).
        distributed.barrier()
        return metrics
    finally:
        distributed.teardown()


# ----------------------------------------------------------------------------- setup


# ----------------------------------------------------------------------------- one update


def train_step(
    run: Run, batches: Sequence[Batch], votes: Callable[[], Sequence[float]] | None = None
) -> StepResult:
    """One optimizer update from this rank's micro-batches.

    Forward under autocast, label-smoothed loss, backward (all-reducing gradients only after the
    last micro-batch), then gradients scaled to sum / (target tokens of the whole update, all
    ranks), clipped at ``train.clip_norm`` when it is > 0, optimizer and scheduler step. An update
    whose loss is not finite changes no weight; an out-of-memory error (single process) skips it.

    Args:
        votes: called right before the all-reduce of the token counts; what it returns travels in
            that same collective and comes back summed over ranks (the loop's stop vote).
    """
    tc, device, world_size = run.config.train, run.info.device, run.info.world_size
    net, optimizer, scaler, dtype = run.net, run.optimizer, run.scaler, run.dtype
    net.train()
    linear_kernel = float32_linear(device, dtype, tc.compile)
    loss_sum = torch.zeros((), device=device)
    nll_sum = torch.zeros((), device=device)
    try:
        for i, batch in enumerate(batches):
            batch = batch.to(device)
            # Gradients are all-reduced only after the last micro-batch of the update.
            last = i == len(batches) - 1
            with net.no_sync() if world_size > 1 and not last else nullcontext():
                autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
                with autocast, linear_kernel:
                    logits = _forward(net, batch)
                    loss, nll, _ = label_smoothed_nll(logits, batch.tgt_out, tc.label_smoothing)
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
            nll_sum += nll.detach()
    except torch.OutOfMemoryError:
        if world_size > 1:
            raise  # the other ranks would wait for ever in the gradient all-reduce
        logits = loss = nll = None  # free the graph before retrying with the next batch
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return StepResult(Outcome.OUT_OF_MEMORY, batch_shape=tuple(batch.tgt_in.shape))
    n_tokens = sum(batch.n_tgt_tokens for batch in batches)
    extra = list(votes()) if votes is not None else []
    total_tokens, total_loss, total_nll, *summed = distributed.all_reduce_sum(
        [n_tokens, loss_sum.item(), nll_sum.item(), *extra]
    )
    if not math.isfinite(total_loss):
        if scaler.is_enabled():  # fp16: let the scaler see the overflow and back off
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return StepResult(
            Outcome.NON_FINITE, total_loss, total_nll, total_tokens, votes=tuple(summed)
        )
    scaler.unscale_(optimizer)
    grads = [p.grad for p in run.params if p.grad is not None]
    grad_norm, factor = _scale_and_clip(grads, world_size / total_tokens, tc.clip_norm)
    torch._foreach_mul_(grads, factor)
    lr = optimizer.param_groups[0]["lr"]
    scaler.step(optimizer)
    scaler.update()
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(
        Outcome.UPDATED, total_loss, total_nll, total_tokens, grad_norm, lr, tuple(summed)
    )


def _scale_and_clip(
    grads: list[torch.Tensor], scale: float, clip_norm: float
) -> tuple[float, float]:
    """The norm of ``scale * grads`` and the one factor that scales and clips them.

    DDP averaged the gradients over ranks and ``scale`` turns them into sum / (target tokens in
    the update); clipping at ``clip_norm`` (> 0) then multiplies by ``clip_norm / (norm + 1e-6)``
    when that is below 1, as ``nn.utils.clip_grad_norm_`` does. Folding both into one
    multiplication, with the norm taken before it, saves a pass over every gradient per update
    and the per-tensor Python loop of ``clip_grad_norm_`` (which CPU tensors get).
    """
    if not grads:
        return 0.0, scale
    norm = scale * float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
    clip = clip_norm / (norm + 1e-6) if clip_norm > 0 else 1.0
    return norm, scale * clip if clip < 1.0 else scale


# ----------------------------------------------------------------------------- the loop


def _loop(run: Run) -> dict[str, float]:
    """One update a turn until a stop condition; evaluate, save and log on their cadences."""
    tc, progress = run.config.train, run.progress
    updates = _updates(run)
    log = TrainLog(
        Path(tc.out_dir) if run.info.is_main else None, tc.log_every, tc.max_steps, tc.max_minutes
    )
    start = time.monotonic() - progress.elapsed_seconds  # the budget is the run's (resumes too)
    faults = Faults()
    metrics: dict[str, float] = {}
    stop = finished(progress, tc)  # why training stops; None goes on (a resume may be done)

    def votes() -> list[float]:
        # The seconds trained travel too: every rank ramps its rate down from the same mean.
        elapsed = time.monotonic() - start
        time_up = tc.max_minutes > 0 and elapsed > tc.max_minutes * 60
        return [float(stop_signal.is_set()), float(time_up), elapsed]

    with stop_requests() as stop_signal, closing(log):
        while stop is None:
            progress.epoch, progress.position, progress.epoch_done, batches = next(updates)
            result = train_step(run, batches, votes)
            if result.outcome is not Outcome.UPDATED:
                stop = _skipped(run, faults, result)
                continue
            faults.oom_in_a_row = faults.nonfinite_in_a_row = 0
            progress.step += 1
            log.add(result.loss, result.nll, result.tokens)
            if log.due(progress.step):
                elapsed = time.monotonic() - start
                log.train_line(progress.step, progress.epoch, result.lr, result.grad_norm, elapsed)
            signal_votes, time_votes, elapsed_sum = result.votes
            stop = finished(progress, tc, signal_votes, time_votes)
            if tc.cooldown:  # the rate of the next update
                elapsed = elapsed_sum / run.info.world_size
                ramp = cooldown_factor(progress.step + 1, elapsed, tc)
                apply_cooldown(run.optimizer, ramp, tc.min_lr)
            with log.paused():  # evaluation and saving do not count towards tokens/s
                improved = False
                evaluate_now = _due(progress, tc.eval_every, progress.epoch_done)
                # An interrupted run saves without an extra evaluation: best and patience must
                # come out of a resume exactly as out of an uninterrupted run.
                if evaluate_now or (stop and stop != STOP_REQUESTED):
                    metrics = _validate(run)
                    improved = update_best(progress, metrics, tc.best_metric)
                    log.eval_line(progress.step, metrics, progress.best)
                    if tc.patience and progress.bad_evals >= tc.patience and not stop:
                        stop = f"no improvement in {tc.patience} evaluations"
                if _due(progress, tc.save_every, evaluate_now) or improved or stop:
                    progress.elapsed_seconds = time.monotonic() - start
                    _save(run, improved)
    if not metrics and stop != STOP_REQUESTED:  # a preempted process has no time to spare
        metrics = _validate(run)
    run.log(f"stopped at update {progress.step}: {stop}")
    return {
        "step": progress.step,
        "epoch": progress.epoch,
        "train_loss": log.train_loss,
        "best": progress.best,
        "nonfinite_updates": faults.nonfinite,
        "oom_skipped": faults.oom,
        "train_seconds": time.monotonic() - start,  # this run's wall time, resumes included
        **metrics,
    }


def _validate(run: Run) -> dict[str, float]:
    """Validation loss (and greedy BLEU with ``train.eval_bleu``), summed over ranks."""
    config, corpus = run.config, run.valid_corpus
    batches = validation_batches(corpus, config.batch, config.train.seed)
    metrics = validation_loss(
        run.forward_model, batches, run.info, config.train.label_smoothing, run.dtype
    )
    if config.train.eval_bleu and not isinstance(corpus, LMCorpus):
        metrics["bleu"] = validation_bleu(
            run.model, corpus, run.tokenizer, run.info, config.train.eval_bleu_sentences,
            config.decode, config.model.max_positions,
        )  # fmt: skip
    return metrics


def _due(progress: Progress, every: int, otherwise: bool) -> bool:
    """Every ``every`` updates, or (``every`` = 0) when ``otherwise`` says so."""
    return progress.step % every == 0 if every else otherwise


def _skipped(run: Run, faults: Faults, result: StepResult) -> str | None:
    """Count a skipped update and say so; the reason to stop once too many come in a row."""
    update = run.progress.step + 1
    if result.outcome is Outcome.OUT_OF_MEMORY:
        faults.oom, faults.oom_in_a_row = faults.oom + 1, faults.oom_in_a_row + 1
        print(
            f"warning: update {update}: out of memory (target batch {result.batch_shape}); "
            f"update skipped ({faults.oom} so far); consider lowering batch.max_tokens",
            file=sys.stderr,
            flush=True,
        )
        if faults.oom_in_a_row >= MAX_OOM_IN_A_ROW:
            return f"{faults.oom_in_a_row} out-of-memory errors in a row"
        return None
    faults.oom_in_a_row = 0
    faults.nonfinite, faults.nonfinite_in_a_row = (
        faults.nonfinite + 1,
        faults.nonfinite_in_a_row + 1,
    )
    run.log(f"update {update}: non-finite loss, skipped ({faults.nonfinite} so far)")
    if faults.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
        return f"{faults.nonfinite_in_a_row} non-finite losses in a row"
    return None


def _save(run: Run, improved: bool) -> None:
    """Save ``step_<n>`` (rank 0 writes; every rank contributes its RNG states)."""
    tc = run.config.train
    trainer_state = _trainer_state(run)
    if not run.info.is_main:
        return
    try:
        save_training_checkpoint(
            tc.out_dir, run.progress.step, run.model, run.config, run.tokenizer, trainer_state,
            improved, tc.keep_last,
        )  # fmt: skip
    except OSError as error:  # a full disk, a lost mount: the previous checkpoint stays whole
        where = error.filename or Path(tc.out_dir) / "checkpoints" / f"step_{run.progress.step}"
        reason = error.strerror or str(error)
        raise CheckpointError(f"{where}: cannot save the checkpoint: {reason}") from None


def _seq2seq_updates(
    corpora: Sequence[TokenizedCorpus],
    config: RunConfig,
    info: distributed.DistInfo,
    epoch: int,
    done: int,
) -> Iterator[tuple[int, int, bool, list[Batch]]]:
    """Yield ``(epoch, batches used in epoch, epoch finished, this rank's micro-batches)`` forever.

    Epoch ``e`` reads ``corpora[(e - 1) % len(corpora)]``: the one prepared training split, or
    its sampled segmentations in turn (``data.subword_alpha``).

    Starts after the first ``done`` batches of ``epoch`` (resume; counted in batches so that a run
    resumed with another world size or update_freq skips no more than a partial update). The batch
    list is truncated to a multiple of ``world_size * update_freq`` so that every rank sees the
    same number of micro-batches.
    """
    group = info.world_size * config.train.update_freq
    while True:
        corpus = corpora[(epoch - 1) % len(corpora)]
        batches = batch_indices(corpus, config.batch.max_tokens, config.train.seed, epoch)
        n_updates = len(batches) // group
        if n_updates == 0:
            raise ConfigError(
                f"{len(batches)} batches per epoch cannot feed one update of {group} batches "
                "(world_size x train.update_freq); lower batch.max_tokens or update_freq"
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
            lm_batch(corpus, config.batch.block_size, config.batch.batch_size, generator)
            for _ in range(config.train.update_freq)
        ]
        yield 1, 0, False, batches


def _updates(run: Run) -> Iterator[tuple[int, int, bool, list[Batch]]]:
    if isinstance(run.train_corpus, LMCorpus):
        return _lm_updates(run.train_corpus, run.config, run.generator)
    progress = run.progress
    corpora = run.train_samples or [run.train_corpus]
    return _seq2seq_updates(corpora, run.config, run.info, progress.epoch, progress.position)


def _trainer_state(run: Run) -> dict[str, Any]:
    """Everything besides the weights that an exact resume needs; gathers every rank's RNGs."""
    rng = {"global": capture_rng_state(), "lm": run.generator.get_state()}
    return {
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "counters": run.progress.counters(),
        "rng": distributed.all_gather_objects(rng),
    }


def main(argv: list[str] | None = None) -> int:
    """``seq2seq train CONFIG.yaml [section.key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="seq2seq train", description="Train a model; rerun with the same out_dir to resume."
    )
    parser.add_argument("config", help="YAML run config (see seq2seq/config.py)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
        if config.train.processes > 1 and distributed.launch_env().world_size == 1:
            argv = [args.config, *args.overrides]
            tc = config.train
            return distributed.launch_local(tc.processes, "seq2seq.train", argv, tc.device)
        metrics = train(config)
    # OSError: e.g. an unwritable out_dir; its message names the path.
    except (ConfigError, DataError, TokenizerError, CheckpointError, OSError) as error:
        print(f"seq2seq train: error: {error}", file=sys.stderr)
        return 2
    launched = distributed.launch_env()
    if launched.rank == 0:  # the process group is gone by now
        print(
            " | ".join(f"{key} {value:.4g}" for key, value in metrics.items() if value is not None)
        )
    elif launched.world_size > 1:
        # The other ranks have nothing left to write, and interpreter shutdown is skipped: a gloo
        # rank that had finished, saved nothing pending and left the process group was seen to
        # abort there ("terminate called without an active exception", SIGABRT) in 2 of 3 full
        # test-suite runs on an AMD EPYC, failing a run whose work was done.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
