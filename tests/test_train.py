"""The training loop: exact resume, DDP equivalence, overfitting, bf16, GPT mode, failure paths."""

from __future__ import annotations

import gzip
import os
import random
import signal
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from helpers import QUIET, TINY_MODEL, toy_run_config, write_toy_task
from safetensors.torch import load_file

from seq2seq import train as train_module
from seq2seq import trainlog
from seq2seq.checkpoint import load_model, load_trainer_state, read_pointer
from seq2seq.config import ConfigError, config_from_dict, load_config
from seq2seq.hardware import resolve_precision
from seq2seq.prepare import prepare


def _config(out_dir: Path, prepared: Path, corpus: Path, **train):
    return config_from_dict(
        toy_run_config(out_dir, prepared, corpus, **{"lr_schedule": "inverse_sqrt", **train})
    )


@pytest.fixture(scope="module")
def copy_task(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus folder, prepared folder) shared by the tests of this module."""
    root = tmp_path_factory.mktemp("copy_task")
    write_toy_task(root / "corpus", n_train=160, n_valid=24)
    prepare(_config(root / "unused", root / "prepared", root / "corpus"))
    return root / "corpus", root / "prepared"


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step}" / "model.safetensors"))


def _assert_same_weights(first, second, atol: float = 0.0) -> None:
    assert first.keys() == second.keys()
    for name in first:
        if atol == 0.0:
            assert torch.equal(first[name], second[name]), name
        else:
            torch.testing.assert_close(first[name], second[name], rtol=0, atol=atol, msg=name)


def test_resume_is_bit_exact(copy_task, tmp_path):
    corpus, prepared = copy_task
    # 7 updates of 2 micro-batches cross an epoch boundary (~6 updates per epoch); dropout is on.
    settings = dict(max_steps=14, update_freq=2, eval_every=4, clip_norm=1.0)
    straight = _config(tmp_path / "straight", prepared, corpus, **settings)
    result = train_module.train(straight)
    assert result["step"] == 14 and result["epoch"] >= 2

    halves = tmp_path / "halves"
    train_module.train(_config(halves, prepared, corpus, **{**settings, "max_steps": 7}))
    assert load_trainer_state(halves / "checkpoints" / "step_7")["counters"]["step"] == 7
    resumed = train_module.train(_config(halves, prepared, corpus, **settings))
    assert resumed["step"] == 14
    _assert_same_weights(_weights(tmp_path / "straight", 14), _weights(halves, 14))
    assert resumed["valid_loss"] == result["valid_loss"]


def _ddp_worker(rank: int, world_size: int, port: int, config) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    train_module.train(config)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_accumulation(copy_task, tmp_path):
    corpus, prepared = copy_task
    common = dict(max_steps=5, clip_norm=0.5, num_threads=1)
    single = _config(tmp_path / "single", prepared, corpus, update_freq=2, **common)
    double = _config(tmp_path / "ddp", prepared, corpus, update_freq=1, **common)
    single = config_from_dict({**single.to_dict(), "model": dict(TINY_MODEL, dropout=0.0)})
    double = config_from_dict({**double.to_dict(), "model": dict(TINY_MODEL, dropout=0.0)})
    train_module.train(single)
    mp.spawn(_ddp_worker, args=(2, _free_port(), double), nprocs=2, join=True)
    state = load_trainer_state(tmp_path / "ddp" / "checkpoints" / "step_5")
    assert len(state["rng"]) == 2  # both ranks took part
    _assert_same_weights(_weights(tmp_path / "single", 5), _weights(tmp_path / "ddp", 5), 1e-6)


def _launched(tmp_path: Path, name: str, raw: dict) -> subprocess.CompletedProcess:
    """``python -m seq2seq.train`` on ``raw`` written as ``<name>.yaml``."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "seq2seq.train", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_train_processes_starts_ranks_that_equal_one_process_with_accumulation(copy_task, tmp_path):
    """``train.processes=2``: the command starts two gloo ranks itself through torchrun's
    launcher, and they compute what one process accumulating two batches computes."""
    corpus, prepared = copy_task
    common = dict(max_steps=5, clip_norm=0.5, num_threads=1, lr_schedule="inverse_sqrt")
    single = toy_run_config(tmp_path / "single", prepared, corpus, update_freq=2, **common)
    single["model"]["dropout"] = 0.0
    train_module.train(config_from_dict(single))
    launched = toy_run_config(tmp_path / "launched", prepared, corpus, processes=2, **common)
    launched["model"]["dropout"] = 0.0
    done = _launched(tmp_path, "launched", launched)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parameters on cpu x2" in done.stdout
    assert sum(line.startswith("step 5 | ") for line in done.stdout.splitlines()) == 1  # rank 0
    state = load_trainer_state(tmp_path / "launched" / "checkpoints" / "step_5")
    assert len(state["rng"]) == 2  # both ranks took part
    _assert_same_weights(_weights(tmp_path / "single", 5), _weights(tmp_path / "launched", 5), 1e-6)


def test_train_processes_passes_on_a_rank_s_error_and_exit_code(copy_task, tmp_path):
    corpus, _ = copy_task
    raw = toy_run_config(tmp_path / "run", tmp_path / "prepared", tmp_path / "absent", processes=2)
    done = _launched(tmp_path, "bad", raw)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("seq2seq train: error:")]
    assert errors and str(tmp_path / "absent") in errors[0]


def test_train_processes_must_be_positive():
    with pytest.raises(ConfigError, match="train.processes"):
        config_from_dict({"train": {"processes": 0}})


def test_bf16_autocast_trains_on_cpu(copy_task, tmp_path):
    corpus, prepared = copy_task
    config = _config(tmp_path / "bf16", prepared, corpus, max_steps=30, precision="bf16")
    config = config_from_dict({**config.to_dict(), "model": dict(TINY_MODEL, dropout=0.0)})
    before = _initial_valid_loss(config)
    result = train_module.train(config)
    assert result["valid_loss"] < before - 0.3


def _initial_valid_loss(config) -> float:
    """Validation loss of the freshly initialised model (0 updates would not save)."""
    probe = config_from_dict(
        {
            **config.to_dict(),
            "train": {
                **config.to_dict()["train"],
                "max_steps": 1,
                "lr": 1e-9,
                "eval_bleu": False,
                "out_dir": config.train.out_dir + "_probe",
            },
        }
    )
    return train_module.train(probe)["valid_loss"]


def _progress_lines(text: str) -> list[int]:
    """The update numbers of the training progress lines in ``text``."""
    return [int(line.split()[1]) for line in text.splitlines() if " | epoch " in line]


def test_a_progress_line_comes_after_a_silence_whatever_log_every_is(
    copy_task, tmp_path, capsys, monkeypatch
):
    corpus, prepared = copy_task
    train_module.train(_config(tmp_path / "quiet", prepared, corpus, max_steps=3))
    assert _progress_lines(capsys.readouterr().out) == []  # log_every=1000, updates are fast
    monkeypatch.setattr(trainlog, "LOG_SECONDS", 0.0)  # every update comes after a "silence"
    train_module.train(_config(tmp_path / "timed", prepared, corpus, max_steps=3))
    assert _progress_lines(capsys.readouterr().out) == [1, 2, 3]


def test_progress_lines_follow_log_every_or_the_clock():
    clock = [100.0]
    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainlog, "time", fake_time)
        log = trainlog.TrainLog(None, log_every=4, max_steps=0, max_minutes=0.0)
        log.enabled = True  # rank 0 without a TensorBoard folder
        due = []
        for step in range(1, 13):
            clock[0] += 1.0 if step < 6 else 25.0  # 1 s an update, then 25 s an update
            due.append(log.due(step))
            if due[-1]:
                log.train_line(step, 1, 1e-3, 1.0, elapsed=0.0)
    # Updates 4 and 8 on the cadence; after 30 s of silence at 7 and then every second update.
    assert [step for step, is_due in enumerate(due, 1) if is_due] == [4, 7, 8, 10, 12]


def test_precision_auto_is_resolved_printed_and_noted_in_the_run_config(
    copy_task, tmp_path, capsys
):
    corpus, prepared = copy_task
    config = _config(tmp_path / "auto", prepared, corpus, max_steps=1, device="cpu")
    assert config.train.precision == "auto"
    train_module.train(config)
    choice = resolve_precision("auto", "cpu", config.model.d_model)
    line = choice.describe("auto")
    assert (
        line.startswith(f"precision: auto -> {choice.precision} (")
        and line in capsys.readouterr().out
    )
    saved = (tmp_path / "auto" / "config.yaml").read_text()
    assert f"  precision: auto  # {line}\n" in saved
    assert load_config(tmp_path / "auto" / "config.yaml") == config  # still "auto" on resume


def test_fp16_on_cpu_is_refused(copy_task, tmp_path):
    corpus, prepared = copy_task
    config = _config(
        tmp_path / "fp16", prepared, corpus, max_steps=1, precision="fp16", device="cpu"
    )
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        train_module.train(config)


def test_nonfinite_losses_skip_updates_then_stop(copy_task, tmp_path, monkeypatch):
    corpus, prepared = copy_task
    real_loss = train_module.label_smoothed_nll

    def poisoned(logits, target, epsilon):
        loss, nll, n_tokens = real_loss(logits, target, epsilon)
        return loss * float("nan"), nll, n_tokens

    config = _config(tmp_path / "nan", prepared, corpus, max_steps=50, save_every=1)
    monkeypatch.setattr(train_module, "label_smoothed_nll", poisoned)
    result = train_module.train(config)
    assert result["step"] == 0
    assert result["nonfinite_updates"] == train_module.MAX_NONFINITE_IN_A_ROW
    assert not (tmp_path / "nan" / "checkpoints").exists()


def test_best_checkpoint_and_patience(copy_task, tmp_path):
    corpus, prepared = copy_task
    # lr 0 after warmup cannot improve, so patience 2 stops after the third evaluation.
    config = _config(
        tmp_path / "patience",
        prepared,
        corpus,
        max_steps=100,
        eval_every=2,
        save_every=0,
        patience=2,
        lr_schedule="constant",
        lr=1e-12,
        keep_last=1,
    )
    result = train_module.train(config)
    assert result["step"] == 6
    best = read_pointer(tmp_path / "patience", "best")
    assert best is not None and best.name == "step_2"
    assert sorted(p.name for p in (tmp_path / "patience" / "checkpoints").glob("step_*")) == [
        "step_2",
        "step_6",
    ]
    model, tokenizer, loaded = load_model(best)
    assert loaded.train.patience == 2 and tokenizer.vocab_size > 4


def _write_lm_text(path: Path) -> None:
    rng = random.Random(1)
    lines = [
        " ".join(rng.choices(["to be", "or not", "that is", "the question"], k=5))
        for _ in range(300)
    ]
    path.write_text("\n".join(lines) + "\n")


def test_gpt_mode_trains_and_resumes_exactly(tmp_path):
    _write_lm_text(tmp_path / "text.txt")

    def config(out: str, steps: int):
        return config_from_dict(
            {
                "model": dict(
                    arch="gpt",
                    d_model=32,
                    n_heads=2,
                    d_ff=64,
                    n_encoder_layers=0,
                    n_decoder_layers=2,
                    dropout=0.1,
                    norm_first=True,
                    positions="learned",
                    max_positions=32,
                ),
                "data": dict(format="lm", path=str(tmp_path / "text.txt"), tokenizer="char"),
                "prepare": dict(out_dir=str(tmp_path / "prepared"), num_workers=1),
                "batch": dict(block_size=32, batch_size=8),
                "train": dict(
                    QUIET,
                    out_dir=str(tmp_path / out),
                    max_steps=steps,
                    lr=3e-3,
                    lr_schedule="constant",
                    warmup_steps=5,
                    update_freq=2,
                ),
            }
        )

    first = train_module.train(config("straight", 30))
    assert first["valid_loss"] < 2.0  # a uniform guess over ~20 characters is ~3.0
    train_module.train(config("halves", 15))
    train_module.train(config("halves", 30))
    _assert_same_weights(_weights(tmp_path / "straight", 30), _weights(tmp_path / "halves", 30))


def _write_multi30k_slice(shared_data: Path, folder: Path, n_train: int, valid: str) -> None:
    """The first ``n_train`` training pairs; ``valid`` = "train" reuses them, "val" takes 200."""
    folder.mkdir(parents=True, exist_ok=True)
    for lang in ("de", "en"):
        for split, source_split, size in (("train", "train", n_train), ("val", valid, 200)):
            size = n_train if source_split == "train" else size
            with gzip.open(shared_data / "multi30k" / f"{source_split}.{lang}.gz", "rt") as handle:
                lines = [next(handle) for _ in range(size)]
            (folder / f"{split}.{lang}").write_text("".join(lines))


def _multi30k_config(root: Path, model: dict, vocab_size: int, max_tokens: int, **train):
    """A run over the Multi30k slice in ``root/corpus``, prepared into ``root/prepared``."""
    return config_from_dict(
        {
            "model": model,
            "data": dict(path=str(root / "corpus"), vocab_size=vocab_size),
            "prepare": dict(out_dir=str(root / "prepared"), num_workers=1),
            "batch": dict(max_tokens=max_tokens),
            "train": dict(QUIET, out_dir=str(root / "run"), **train),
        }
    )


def test_overfits_fifty_multi30k_pairs(shared_data, tmp_path):
    _write_multi30k_slice(shared_data, tmp_path / "corpus", 50, "train")
    config = _multi30k_config(
        tmp_path,
        dict(
            d_model=64,
            n_heads=4,
            d_ff=128,
            n_encoder_layers=1,
            n_decoder_layers=1,
            dropout=0.0,
            max_positions=256,
        ),
        vocab_size=300,
        max_tokens=3000,  # one batch holds all 50 pairs, so every update is a full-batch step
        max_steps=120,
        lr=5e-3,
        lr_schedule="constant",
        warmup_steps=10,
        label_smoothing=0.0,
        clip_norm=1.0,
        eval_bleu=True,
        eval_bleu_sentences=50,
    )
    result = train_module.train(config)
    # The validation split here is the training set itself: memorised means near-zero NLL
    # (a uniform guess over the 300 pieces would be ln 300 = 5.7), and greedy decoding gives the
    # references back: a BLEU that a broken decoder or a mismatched reference list cannot reach.
    assert result["valid_nll"] < 0.1
    assert result["bleu"] > 90.0


@pytest.mark.slow
def test_sigint_finishes_the_update_saves_and_exits(copy_task, tmp_path):
    corpus, prepared = copy_task
    config = _config(tmp_path / "run", prepared, corpus, max_steps=100_000, log_every=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config.to_dict()))
    command = [sys.executable, "-m", "seq2seq", "train", str(tmp_path / "run.yaml")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    output = []
    try:
        for line in process.stdout:
            output.append(line)
            if line.startswith("update 3 |"):
                process.send_signal(signal.SIGINT)
                break
        rest, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    text = "".join(output) + rest
    assert process.returncode == 0, text
    assert "stop requested" in text
    saved = read_pointer(tmp_path / "run", "last")
    assert saved is not None and load_trainer_state(saved)["counters"]["step"] >= 3


@pytest.mark.slow
def test_short_multi30k_run_lowers_validation_loss(shared_data, tmp_path):
    _write_multi30k_slice(shared_data, tmp_path / "corpus", 3000, "val")
    config = _multi30k_config(
        tmp_path,
        dict(d_model=64, n_heads=4, d_ff=128, n_encoder_layers=2, n_decoder_layers=2, dropout=0.1),
        vocab_size=1000,
        max_tokens=1500,
        max_steps=40,
        lr=2e-3,
        lr_schedule="inverse_sqrt",
        warmup_steps=20,
        eval_bleu=True,
        eval_bleu_sentences=16,
    )
    before = _initial_valid_loss(config)
    result = train_module.train(config)
    assert result["valid_loss"] < before - 1.0
    # 40 updates leave BLEU near 0, where a broken scorer looks the same: what the score means
    # is checked on a memorised set in test_overfits_fifty_multi30k_pairs.
    assert "bleu" in result


@pytest.mark.skipif(
    not hasattr(torch.ops.mkldnn, "_linear_pointwise"), reason="torch built without oneDNN"
)
def test_float32_training_on_onednn_linear_layers_follows_the_mkl_run(
    copy_task, tmp_path, monkeypatch
):
    """The same 10 updates with every linear layer on oneDNN (as on AMD with AVX-512) and on
    PyTorch's default kernel: both are float32 products, so the runs part only by rounding."""
    from seq2seq import kernels

    corpus, prepared = copy_task
    calls = []
    original_apply = kernels.OneDNNLinear.apply
    monkeypatch.setattr(
        kernels.OneDNNLinear, "apply", lambda *a: calls.append(1) or original_apply(*a)
    )
    results = {}
    for onednn in (True, False):
        monkeypatch.setattr(kernels, "onednn_float32_linear_is_faster", lambda on=onednn: on)
        config = _config(tmp_path / str(onednn), prepared, corpus, max_steps=10, precision="fp32")
        config = config_from_dict({**config.to_dict(), "model": dict(TINY_MODEL, dropout=0.0)})
        results[onednn] = train_module.train(config), _weights(tmp_path / str(onednn), 10)
        if onednn:
            assert calls, "no linear layer ran on oneDNN"
            calls.clear()
    assert not calls  # the default run never touched it
    (on, on_weights), (off, off_weights) = results[True], results[False]
    assert on["train_loss"] == pytest.approx(off["train_loss"], rel=1e-4)
    assert on["valid_loss"] == pytest.approx(off["valid_loss"], rel=1e-4)
    # Adam's first updates move each weight by up to lr per step whatever the gradient's size, so
    # a rounding-level difference in a near-zero gradient may flip a step: 10 steps x lr bound it.
    _assert_same_weights(on_weights, off_weights, atol=10 * config.train.lr)


@pytest.fixture(scope="module")
def sampled_task(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(corpus, prepared, data section) of the copy task in BPE with 3 sampled segmentations."""
    root = tmp_path_factory.mktemp("sampled_task")
    write_toy_task(root / "corpus", n_train=160, n_valid=24)
    data = dict(tokenizer="bpe", vocab_size=40, subword_alpha=0.2, subword_samples=3)
    raw = toy_run_config(root / "unused", root / "prepared", root / "corpus")
    prepare(config_from_dict({**raw, "data": {**raw["data"], **data}}))
    return root / "corpus", root / "prepared", data


def _sampled_config(task, out_dir: Path, **train):
    corpus, prepared, data = task
    raw = toy_run_config(out_dir, prepared, corpus, **train)
    return config_from_dict({**raw, "data": {**raw["data"], **data}})


def test_epochs_cycle_through_the_sampled_segmentations(sampled_task, tmp_path):
    from seq2seq.data import TokenizedCorpus, batch_indices, collate
    from seq2seq.distributed import DistInfo

    config = _sampled_config(sampled_task, tmp_path / "run")
    samples = [TokenizedCorpus(sampled_task[1], s) for s in config.data.sampled_splits()]
    assert len(samples) == 3
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    updates = train_module._seq2seq_updates(samples, config, info, epoch=1, done=0)
    seen: dict[int, list] = {}
    for epoch, _, _, (batch,) in updates:
        if epoch == 5:
            break
        seen.setdefault(epoch, []).append(batch)
    for epoch, batches in seen.items():
        corpus = samples[(epoch - 1) % 3]
        expected = batch_indices(corpus, config.batch.max_tokens, config.train.seed, epoch)
        assert len(batches) == len(expected)
        for got, indices in zip(batches, expected):
            assert torch.equal(got.src, collate(corpus, indices).src)
            assert torch.equal(got.tgt_out, collate(corpus, indices).tgt_out)


def test_resume_with_sampled_segmentations_is_bit_exact(sampled_task, tmp_path):
    # An epoch is about 16 batches, more or fewer as the drawn segmentations make it (SentencePiece
    # draws other samples in another process), so 28 updates of 2 batches cross two epoch
    # boundaries with room to spare (16 updates did not always).
    settings = dict(max_steps=28, update_freq=2, eval_every=14, lr_schedule="inverse_sqrt")
    result = train_module.train(_sampled_config(sampled_task, tmp_path / "straight", **settings))
    assert result["epoch"] >= 3  # two epoch boundaries, so two changes of segmentation
    halves = tmp_path / "halves"
    train_module.train(_sampled_config(sampled_task, halves, **{**settings, "max_steps": 13}))
    resumed = train_module.train(_sampled_config(sampled_task, halves, **settings))
    _assert_same_weights(_weights(tmp_path / "straight", 28), _weights(halves, 28))
    assert resumed["valid_loss"] == result["valid_loss"]
