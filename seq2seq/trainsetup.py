"""Setting up a training run: the settings checked, the data prepared, model, optimizer,
scheduler and grad scaler built, and the state of a checkpoint restored for an exact resume.

:func:`setup` gives the :class:`Run` that :mod:`seq2seq.train` steps; :func:`torch_settings`
applies the process-wide torch settings of ``train.*`` for the run and puts the old ones back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from seq2seq import distributed, rundir
from seq2seq.checkpoint import (
    TRAINER_STATE_KEYS,
    find_resume_checkpoint,
    load_config_file,
    load_trainer_state,
    load_weights,
    restore_rng_state,
    verify_checksums,
)
from seq2seq.config import ConfigError, RunConfig, TrainConfig, save_config
from seq2seq.data import MANIFEST, TOKENIZER_DIR, LMCorpus, TokenizedCorpus, read_manifest
from seq2seq.hardware import PrecisionChoice, cpu_has_native_bf16, resolve_precision
from seq2seq.model import build_model, count_parameters
from seq2seq.optim import build_optimizer, build_scheduler
from seq2seq.prepare import data_fingerprint, new_manifest, prepare
from seq2seq.textio import atomic_write_text
from seq2seq.tokenizer import Tokenizer

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
    # data.subword_alpha > 0: the training split's sampled segmentations, one per epoch in turn
    train_samples: list[TokenizedCorpus] = field(default_factory=list)
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


def setup(config: RunConfig, info: distributed.DistInfo) -> Run:
    """Check the settings, prepare the data, build model/optimizer/corpora and resume if possible."""
    tc, device = config.train, info.device
    check_settings(config, device)
    precision = resolve_train_precision(tc, device, config.model.d_model)
    described = precision.describe(tc.precision)
    seed_everything(tc.seed + info.rank)
    out_dir = Path(tc.out_dir)
    if info.is_main:
        resume = rundir.choose_resume(config)  # before anything in out_dir is rewritten
        print(yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())
        print(described, flush=True)
        save_config(config, out_dir / "config.yaml", {"train.precision": described})
        if tc.init_from and resume is None:
            use_init_tokenizer(config)
        prepare(config)  # idempotent; one process writes, the others wait at the barrier
    distributed.barrier()
    prepared = config.prepared_dir()
    tokenizer = Tokenizer.load(prepared / "tokenizer")
    if not info.is_main:  # rank 0 chose and checked; the same files give the others the same
        resume_dir = find_resume_checkpoint(out_dir)
        resume = (
            None
            if resume_dir is None
            else (resume_dir, load_trainer_state(resume_dir, required=TRAINER_STATE_KEYS))
        )
    vocab_sizes = tokenizer.src_vocab_size, tokenizer.tgt_vocab_size
    run = build_run(config, info, *vocab_sizes, resume, precision)
    if tc.init_from and resume is None:
        init_weights(run, tokenizer)
    run.log(f"model: {count_parameters(run.model):,} parameters on {device} x{info.world_size}")
    if tc.processes > 1 and info.world_size == 1:
        run.log(f"train.processes={tc.processes}: only `seq2seq train` starts them; training alone")
    run.tokenizer = tokenizer
    corpus = LMCorpus if config.model.arch in ("gpt", "bigram") else TokenizedCorpus
    run.train_corpus = corpus(prepared, config.data.train_split)
    run.train_samples = [TokenizedCorpus(prepared, s) for s in config.data.sampled_splits()]
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
    precision = precision or resolve_train_precision(tc, device, config.model.d_model)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.precision == "fp16")
    generator = torch.Generator().manual_seed(tc.seed + info.rank)
    parts = model, model, model, optimizer, scheduler, scaler, generator, precision
    run = Run(config, info, *parts)
    if resume is not None:
        resume_from(run, *resume)
    if tc.compile:
        torch.compiler.assume_constant_result(cpu_has_native_bf16)  # marks it in place
    run.forward_model = torch.compile(model) if tc.compile else model
    run.net = run.forward_model
    if info.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        # Gradients live in the all-reduce buckets: no copy into them and back (~4% of a
        # small GPT's update on two CPU ranks).
        run.net = DistributedDataParallel(
            run.forward_model, device_ids=device_ids, gradient_as_bucket_view=True
        )
    return run


# Rates that may differ between a model directory and the run fine-tuning it (train.init_from).
_TRAINING_ONLY = ("preset", "dropout", "attention_dropout", "activation_dropout")


def use_init_tokenizer(config: RunConfig) -> None:
    """``train.init_from``: check the model directory against the run, and make its tokenizer
    the one the run's data is encoded with: written into a prepared directory that does not hold
    this data yet; one that does must hold this very tokenizer.

    Raises:
        ConfigError: not a model directory, a model section that differs (the key named), or
            data prepared with another tokenizer.
        CheckpointError: the directory is corrupt (see ``verify_checksums``).
    """
    directory = Path(config.train.init_from)
    where = f"train.init_from={directory}"
    if not (directory / "config.yaml").is_file():
        raise ConfigError(f"{where}: not a model directory (no config.yaml)")
    verify_checksums(directory)
    theirs, ours = asdict(load_config_file(directory).model), asdict(config.model)
    for key in ours:
        if key not in _TRAINING_ONLY and ours[key] != theirs[key]:
            raise ConfigError(
                f"{where}: model.{key} is {ours[key]!r} in this run but {theirs[key]!r} in "
                f"{directory / 'config.yaml'}; fine-tuning needs the same network (start from "
                f"that config.yaml)"
            )
    tokenizer = Tokenizer.load(directory / "tokenizer")
    prepared = config.prepared_dir()
    manifest, settings = read_manifest(prepared), data_fingerprint(config.data)
    if manifest is not None and manifest.get("settings") == settings:
        if not Tokenizer.load(prepared / TOKENIZER_DIR).same_as(tokenizer):
            raise ConfigError(
                f"{where}: {prepared} holds this data encoded with another tokenizer; set "
                f"prepare.out_dir to a new directory to encode it with the model's"
            )
        return
    prepared.mkdir(parents=True, exist_ok=True)
    (prepared / MANIFEST).unlink(missing_ok=True)
    tokenizer.save(prepared / TOKENIZER_DIR)
    atomic_write_text(prepared / MANIFEST, json.dumps(new_manifest(settings, tokenizer), indent=1))


def init_weights(run: Run, tokenizer: Tokenizer) -> None:
    """Start ``run.model`` from ``train.init_from``'s weights; the optimizer stays fresh.

    Raises:
        ConfigError: the data was encoded with another tokenizer (language-model data, whose
            preparation always trains its own).
        CheckpointError: the weights do not fit the model.
    """
    directory = Path(run.config.train.init_from)
    if not Tokenizer.load(directory / "tokenizer").same_as(tokenizer):
        raise ConfigError(
            f"train.init_from={directory}: the prepared data was encoded with another tokenizer "
            f"than the model's (data.format={run.config.data.format} prepares its own)"
        )
    load_weights(run.model, directory)
    run.log(f"init_from: weights from {directory}, fresh optimizer")


def resolve_train_precision(
    tc: TrainConfig, device: torch.device, d_model: int | None = None
) -> PrecisionChoice:
    """``train.precision`` for a model of width ``d_model`` on ``device`` (see
    :func:`seq2seq.hardware.resolve_precision`).

    Raises:
        ConfigError: a precision the device cannot run (fp16 on a CPU).
    """
    try:
        return resolve_precision(tc.precision, device, d_model)
    except ValueError as error:
        raise ConfigError(f"train.precision={tc.precision}: {error}") from None


def resume_from(run: Run, directory: Path, saved: dict[str, Any]) -> None:
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
        seed_everything(run.config.train.seed + info.rank + 1000 * run.progress.step)
    run.log(f"resumed from {directory} at update {run.progress.step}")


def check_settings(config: RunConfig, device: torch.device) -> None:
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
        with keep_freed_memory() if device.type == "cpu" else nullcontext():
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


# glibc's mallopt parameters (malloc.h) and the values used for a CPU run.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
RUN_MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for it on 64-bit
RUN_TRIM_THRESHOLD = 2**30
AFTER_TRIM_THRESHOLD = 2 * RUN_MMAP_THRESHOLD  # where glibc's own adaptive setting tops out


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@contextmanager
def keep_freed_memory() -> Iterator[None]:
    """glibc only: tensors up to 32 MiB come from the heap, and freed memory stays for reuse.

    A training step frees and reallocates the same activations every update. By default glibc
    hands blocks over 128 KiB (its adaptive threshold grows from there) back to the kernel and
    maps them afresh, so every update pays a page fault and a page of zeroes per 4 KiB touched:
    ~600-900 faults per update for the 4 x 128 GPT of nanoGPT's CPU setting, ~6% of its CPU time
    (benchmarks/RESULTS.md). Peak memory is unchanged; memory freed during the run is returned
    only when it ends (``malloc_trim``), with the thresholds left where glibc's adaptive ones end
    up. Elsewhere (macOS, musl) nothing changes.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, RUN_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, RUN_TRIM_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, AFTER_TRIM_THRESHOLD)
        libc.malloc_trim(0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
