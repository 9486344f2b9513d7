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
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sacrebleu
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from seq2seq import distributed, rundir
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
)
from seq2seq.hardware import PrecisionChoice, resolve_precision
from seq2seq.loss import label_smoothed_nll
from seq2seq.model import build_model, count_parameters
from seq2seq.optim import build_optimizer, build_scheduler
from seq2seq.prepare import prepare
from seq2seq.search import TransformerDecoder, greedy
from seq2seq.tokenizer import PAD_ID, Tokenizer, TokenizerError

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

MAX_NONFINITE_IN_A_ROW = 5
MAX_OOM_IN_A_ROW = 3
BLEU_BATCH_SENTENCES = 64
STOP_REQUESTED = "stop requested (signal); resume with the same command"

Corpus = TokenizedCorpus | LMCorpus


@dataclass
class Progress:
    """Where the run stands; saved as ``counters`` in ``trainer_state.pt`` (same keys as ever)."""

    step: int = 0  # optimizer updates done
    epoch: int = 1
    position: int = 0  # batches of the epoch's batch list already consumed
    epoch_done: bool = False
    best: float | None = None  # best value of train.best_metric so far
    bad_evals: int = 0  # evaluations in a row without improvement
    elapsed_seconds: float = 0.0  # wall-clock time trained so far, all resumes together

    def counters(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_counters(cls, counters: dict[str, Any]) -> Progress:
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in counters.items() if name in known})


@dataclass
class Faults:
    """Skipped updates; not saved (a resumed run counts afresh)."""

    nonfinite: int = 0
    nonfinite_in_a_row: int = 0
    oom: int = 0
    oom_in_a_row: int = 0


@dataclass
class Window:
    """Training figures since the last log line; ``time`` excludes evaluation and saving."""

    time: float
    loss: float = 0.0
    nll: float = 0.0
    tokens: float = 0.0
    updates: int = 0


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


@dataclass
class Run:
    """Everything a training run holds: built by :func:`setup` (or :func:`build_run`)."""

    config: RunConfig
    info: distributed.DistInfo
    model: nn.Module  # the plain module: what is saved
    forward_model: nn.Module  # ``model``, compiled when train.compile
    net: nn.Module  # ``forward_model``, DDP-wrapped with several processes
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # language-model block sampling

    precision: PrecisionChoice  # train.precision resolved for this device
    progress: Progress = field(default_factory=Progress)
    tokenizer: Tokenizer | None = None
    train_corpus: Corpus | None = None
    valid_corpus: Corpus | None = None

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for full precision."""
        return self.precision.dtype

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def log(self, *args: Any, **kwargs: Any) -> None:
        if self.info.is_main:
            print(*args, **kwargs)


def train(config: RunConfig) -> dict[str, float]:
    """Train (or resume) the run that ``config`` describes; see the module docstring.

    Process-wide torch settings (threads, deterministic algorithms, cuDNN flags) are applied for
    the run and restored when it returns.

    Returns:
        Final metrics: ``step``, ``epoch``, ``train_loss``, ``valid_loss``, ``valid_nll``,
        ``valid_ppl``, ``best``, ``bleu`` (when evaluated), ``nonfinite_updates``, ``oom_skipped``.
    """
    info = distributed.setup(config.train.device)
    try:
        _check_settings(config, info.device)  # before the lock creates out_dir
        run_lock = rundir.locked(config.train.out_dir) if info.is_main else nullcontext()
        with torch_settings(config.train, info.device), run_lock:
            return _loop(setup(config, info))
    finally:
        distributed.teardown()


@contextmanager
def torch_settings(tc: TrainConfig, device: torch.device) -> Iterator[None]:
    """Apply the process-wide settings ``tc`` asks for; put the previous ones back afterwards."""
    cudnn = torch.backends.cudnn
    before = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.deterministic,
        cudnn.benchmark,
        cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    try:
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        if device.type == "cuda":
            torch.set_float32_matmul_precision("high" if tc.tf32 else "highest")
            cudnn.allow_tf32 = tc.tf32
        if tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for that
        torch.use_deterministic_algorithms(tc.deterministic)
        cudnn.deterministic = tc.deterministic
        cudnn.benchmark = False
        yield
    finally:
        threads, deterministic, warn_only, cudnn_det, benchmark, tf32, matmul, cublas = before
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32 = cudnn_det, benchmark, tf32
        torch.set_float32_matmul_precision(matmul)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


# ----------------------------------------------------------------------------- setup


def setup(config: RunConfig, info: distributed.DistInfo) -> Run:
    """Check the settings, prepare the data, build model/optimizer/corpora and resume if possible."""
    tc, device = config.train, info.device
    _check_settings(config, device)
    precision = resolve_train_precision(tc, device)
    described = precision.describe(tc.precision)
    _seed_everything(tc.seed + info.rank)
    out_dir = Path(tc.out_dir)
    if info.is_main:
        resume = rundir.choose_resume(config)  # before anything in out_dir is rewritten
        print(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
        print(described, flush=True)
        save_config(config, out_dir / "config.yaml", {"train.precision": described})
        prepare(config)  # idempotent; one process writes, the others wait at the barrier
    distributed.barrier()
    prepared = config.prepared_dir()
    tokenizer = Tokenizer.load(prepared / "tokenizer")
    if not info.is_main:  # rank 0 chose and checked; the same files give the others the same
        resume_dir = find_resume_checkpoint(out_dir)
        resume = None if resume_dir is None else (resume_dir, load_trainer_state(resume_dir))
    vocab_sizes = tokenizer.src_vocab_size, tokenizer.tgt_vocab_size
    run = build_run(config, info, *vocab_sizes, resume, precision)
    run.log(f"model: {count_parameters(run.model):,} parameters on {device} x{info.world_size}")
    run.tokenizer = tokenizer
    corpus = LMCorpus if config.model.arch in ("gpt", "bigram") else TokenizedCorpus
    run.train_corpus = corpus(prepared, config.data.train_split)
    run.valid_corpus = corpus(prepared, config.data.valid_split)
    return run


def build_run(
    config: RunConfig,
    info: distributed.DistInfo,
    src_vocab_size: int,
    tgt_vocab_size: int,
    resume: tuple[Path, dict[str, Any]] | None = None,
    precision: PrecisionChoice | None = None,
) -> Run:
    """Model, optimizer, scheduler and grad scaler (restored from ``resume`` = (checkpoint
    directory, its trainer state) when given),
    then compiled and DDP-wrapped; no data. ``benchmarks/bench_train.py`` steps one of these."""
    tc, device = config.train, info.device
    model = build_model(config.model, src_vocab_size, tgt_vocab_size)
    model.to(device)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, tc, config.model.d_model, tc.max_steps)
    precision = precision or resolve_train_precision(tc, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.precision == "fp16")
    generator = torch.Generator().manual_seed(tc.seed + info.rank)
    parts = model, model, model, optimizer, scheduler, scaler, generator, precision
    run = Run(config, info, *parts)
    if resume is not None:
        _resume(run, *resume)
    run.forward_model = torch.compile(model) if tc.compile else model
    run.net = run.forward_model
    if info.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        run.net = DistributedDataParallel(run.forward_model, device_ids=device_ids)
    return run


def resolve_train_precision(tc: TrainConfig, device: torch.device) -> PrecisionChoice:
    """``train.precision`` on ``device`` (see :func:`seq2seq.hardware.resolve_precision`).

    Raises:
        ConfigError: a precision the device cannot run (fp16 on a CPU).
    """
    try:
        return resolve_precision(tc.precision, device)
    except ValueError as error:
        raise ConfigError(f"train.precision={tc.precision}: {error}") from None


def _resume(run: Run, directory: Path, saved: dict[str, Any]) -> None:
    load_weights(run.model, directory)
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    run.scaler.load_state_dict(saved["scaler"])
    run.progress = Progress.from_counters(saved["counters"])
    info = run.info
    if len(saved["rng"]) == info.world_size:
        restore_rng_state(saved["rng"][info.rank]["global"])
        run.generator.set_state(saved["rng"][info.rank]["lm"])
    else:  # a different world size cannot replay the old streams; start fresh ones
        _seed_everything(run.config.train.seed + info.rank + 1000 * run.progress.step)
    run.log(f"resumed from {directory} at update {run.progress.step}")


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
    loss_sum = torch.zeros((), device=device)
    nll_sum = torch.zeros((), device=device)
    try:
        for i, batch in enumerate(batches):
            batch = batch.to(device)
            # Gradients are all-reduced only after the last micro-batch of the update.
            last = i == len(batches) - 1
            with net.no_sync() if world_size > 1 and not last else nullcontext():
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
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
    # DDP averaged gradients over ranks; make them sum / (target tokens in the update).
    params = run.params
    grads = [p.grad for p in params if p.grad is not None]
    torch._foreach_mul_(grads, world_size / total_tokens)
    max_norm = tc.clip_norm if tc.clip_norm > 0 else math.inf
    grad_norm = float(nn.utils.clip_grad_norm_(params, max_norm))
    lr = optimizer.param_groups[0]["lr"]
    scaler.step(optimizer)
    scaler.update()
    run.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(
        Outcome.UPDATED, total_loss, total_nll, total_tokens, grad_norm, lr, tuple(summed)
    )


# ----------------------------------------------------------------------------- the loop


def _loop(run: Run) -> dict[str, float]:
    """One update a turn until a stop condition; evaluate, save and log on their cadences."""
    tc, progress = run.config.train, run.progress
    updates = _updates(run)
    writer = _tensorboard(run)
    stop_signal = threading.Event()
    previous_handlers = _install_signal_handlers(stop_signal)
    start = time.monotonic() - progress.elapsed_seconds  # the budget is the run's (resumes too)
    window, faults = Window(time=time.monotonic()), Faults()
    metrics: dict[str, float] = {}
    logged_loss = math.nan
    stop = _finished(progress, tc)  # why training stops; None goes on (a resume may be done)

    def stop_votes() -> list[float]:
        time_up = tc.max_minutes > 0 and time.monotonic() - start > tc.max_minutes * 60
        return [float(stop_signal.is_set()), float(time_up)]

    try:
        while stop is None:
            progress.epoch, progress.position, progress.epoch_done, batches = next(updates)
            result = train_step(run, batches, stop_votes)
            if result.outcome is not Outcome.UPDATED:
                stop = _skipped(run, faults, result)
                continue
            faults.oom_in_a_row = faults.nonfinite_in_a_row = 0
            progress.step += 1
            window.loss, window.nll = window.loss + result.loss, window.nll + result.nll
            window.tokens, window.updates = window.tokens + result.tokens, window.updates + 1
            if run.info.is_main and tc.log_every and progress.step % tc.log_every == 0:
                logged_loss = _log_train(window, progress, result, tc, start, writer)
            stop = _finished(progress, tc, *result.votes)
            paused = time.monotonic()  # evaluation and saving do not count towards tokens/s
            improved = False
            evaluate_now = _due(progress, tc.eval_every, progress.epoch_done)
            # An interrupted run saves without an extra evaluation: best and patience must come
            # out of a resume exactly as out of an uninterrupted run.
            if evaluate_now or (stop and stop != STOP_REQUESTED):
                metrics = _validate(run)
                improved = _update_best(progress, metrics, tc.best_metric)
                _log_eval(run, metrics, writer)
                if tc.patience and progress.bad_evals >= tc.patience and not stop:
                    stop = f"no improvement in {tc.patience} evaluations"
            if _due(progress, tc.save_every, evaluate_now) or improved or stop:
                progress.elapsed_seconds = time.monotonic() - start
                _save(run, improved)
            window.time += time.monotonic() - paused
    finally:
        _restore_signal_handlers(previous_handlers)
        if writer is not None:
            writer.close()
    if not metrics and stop != STOP_REQUESTED:  # a preempted process has no time to spare
        metrics = _validate(run)
    run.log(f"stopped at update {progress.step}: {stop}")
    return {
        "step": progress.step,
        "epoch": progress.epoch,
        "train_loss": window.loss / window.tokens if window.tokens else logged_loss,
        "best": progress.best,
        "nonfinite_updates": faults.nonfinite,
        "oom_skipped": faults.oom,
        **metrics,
    }


def _tensorboard(run: Run) -> SummaryWriter | None:
    if not run.info.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter  # slow import; rank 0 only

    return SummaryWriter(str(Path(run.config.train.out_dir) / "tensorboard"))


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


def _check_settings(config: RunConfig, device: torch.device) -> None:
    """Settings the config cannot check alone: they depend on the device or the data format."""
    model = config.model
    lengths = (
        [("batch", "block_size")]
        if model.arch in ("gpt", "bigram")
        else [("data", "max_source_len"), ("data", "max_target_len")]
    )
    for section, name in lengths:  # source: pieces + EOS; decoder input: BOS + pieces (LM block)
        value = getattr(getattr(config, section), name)
        if value > model.max_positions:
            raise ConfigError(
                f"model.max_positions ({model.max_positions}) is smaller than {section}.{name} "
                f"({value}, BOS/EOS included): the longest examples would not fit; raise "
                f"model.max_positions or lower {section}.{name}"
            )
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
    return _seq2seq_updates(
        run.train_corpus, run.config, run.info, progress.epoch, progress.position
    )


@torch.no_grad()
def _validate(run: Run) -> dict[str, float]:
    """Loss, NLL and perplexity per target token over the validation split, summed over ranks."""
    run.model.eval()
    config, info, corpus = run.config, run.info, run.valid_corpus
    data, seed = config.batch, config.train.seed
    if isinstance(corpus, LMCorpus):
        batches = lm_eval_batches(
            corpus, data.block_size, data.batch_size, data.eval_batches, seed
        )
    else:
        batches = [collate(corpus, i) for i in batch_indices(corpus, data.max_tokens, seed, 0)]
    dtype, epsilon = run.dtype, config.train.label_smoothing
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)
    for batch in batches[info.rank :: info.world_size]:
        batch = batch.to(info.device)
        with torch.autocast(info.device.type, dtype=dtype, enabled=dtype is not None):
            logits = _forward(run.forward_model, batch)
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
        metrics["bleu"] = _validation_bleu(run, corpus)
    return metrics


def _validation_bleu(run: Run, corpus: TokenizedCorpus) -> float:
    """Greedy-decode the first ``train.eval_bleu_sentences`` validation sources; sacreBLEU.

    References are the prepared target ids decoded back to text (the examples that survived the
    length filter), so the score tracks progress but is not the final test-set number.
    """
    config, info, tokenizer = run.config, run.info, run.tokenizer
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
        hypotheses = greedy(TransformerDecoder(run.model, src), len(chunk), max_len)
        for index, hypothesis in zip(chunk.tolist(), hypotheses):
            reference = tokenizer.decode_target(corpus.target(index).tolist())
            pairs.append((index, tokenizer.decode_target(hypothesis.tokens), reference))
    gathered = sorted(p for part in distributed.all_gather_objects(pairs) for p in part)
    hypotheses = [hypothesis for _, hypothesis, _ in gathered]
    references = [reference for _, _, reference in gathered]
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def _finished(
    progress: Progress, tc: TrainConfig, signal_votes: float = 0.0, time_votes: float = 0.0
) -> str | None:
    """Why training stops at this point, or None to go on (the run's own ends come first)."""
    if tc.max_steps and progress.step >= tc.max_steps:
        return f"reached train.max_steps={tc.max_steps}"
    if tc.max_epochs and progress.epoch_done and progress.epoch >= tc.max_epochs:
        return f"reached train.max_epochs={tc.max_epochs}"
    if time_votes:
        return f"reached train.max_minutes={tc.max_minutes:g}"
    if signal_votes:
        return STOP_REQUESTED
    return None


def _update_best(progress: Progress, metrics: dict[str, float], best_metric: str) -> bool:
    """Record an improvement of ``best_metric`` (lower loss, higher BLEU); count the misses."""
    value = metrics["valid_loss"] if best_metric == "valid_loss" else metrics["bleu"]
    best = progress.best
    better = best is None or (value < best if best_metric == "valid_loss" else value > best)
    if better:
        progress.best, progress.bad_evals = value, 0
    else:
        progress.bad_evals += 1
    return better


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


def _log_train(
    window: Window,
    progress: Progress,
    result: StepResult,
    tc: TrainConfig,
    start: float,
    writer: SummaryWriter | None,
) -> float:
    """Print (and write to TensorBoard) the window's figures, reset it; return its loss."""
    now = time.monotonic()
    tokens = max(window.tokens, 1.0)
    loss, nll = window.loss / tokens, window.nll / tokens
    speed = window.tokens / max(now - window.time, 1e-9)
    seconds_per_update = (now - window.time) / max(window.updates, 1)
    remaining = []
    if tc.max_steps:
        remaining.append((tc.max_steps - progress.step) * seconds_per_update)
    if tc.max_minutes:
        remaining.append(tc.max_minutes * 60 - (now - start))
    eta = f" | eta {_duration(min(remaining))}" if remaining else ""
    lr, grad_norm = result.lr, result.grad_norm
    print(
        f"update {progress.step} | epoch {progress.epoch} | loss {loss:.3f} | nll {nll:.3f} | "
        f"ppl {math.exp(min(nll, 50.0)):.2f} | lr {lr:.3g} | gnorm {grad_norm:.3f} | "
        f"{speed:,.0f} tok/s{eta}",
        flush=True,
    )
    if writer is not None:
        scalars = {"loss": loss, "nll": nll, "lr": lr, "grad_norm": grad_norm, "tok_per_s": speed}
        for name, value in scalars.items():
            writer.add_scalar(f"train/{name}", value, progress.step)
    window.time, window.loss, window.nll, window.tokens, window.updates = now, 0.0, 0.0, 0.0, 0
    return loss


def _log_eval(run: Run, metrics: dict[str, float], writer: SummaryWriter | None) -> None:
    text = " | ".join(f"{name} {value:.3f}" for name, value in metrics.items())
    step = run.progress.step
    run.log(f"update {step} | valid | {text} | best {run.progress.best:.3f}", flush=True)
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
    except OSError as error:  # e.g. an unwritable out_dir: the message names the path
        print(f"seq2seq train: error: {error}", file=sys.stderr)
        return 2
    if distributed.launch_env().rank == 0:  # the process group is gone by now
        print(
            " | ".join(f"{key} {value:.4g}" for key, value in metrics.items() if value is not None)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
