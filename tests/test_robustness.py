"""Fault injection: killed training, corrupt and hostile checkpoints, dirty corpora, non-finite
losses, out-of-memory, untrusted files, translate fuzzing and run-to-run determinism."""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml
from helpers import TINY_MODEL, toy_run_config, write_toy_task
from safetensors.torch import load_file

import seq2seq
from seq2seq import checkpoint
from seq2seq import train as train_module
from seq2seq.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    load_config_file,
    load_model,
    load_trainer_state,
    save_checkpoint,
    save_training_checkpoint,
    step_dirs,
)
from seq2seq.config import ConfigError, ModelConfig, RunConfig, config_from_dict, load_config
from seq2seq.data import TokenizedCorpus
from seq2seq.model import build_model
from seq2seq.prepare import main as prepare_main
from seq2seq.prepare import prepare
from seq2seq.textio import sha256_file
from seq2seq.tokenizer import CharVocab, Tokenizer
from seq2seq.translate import main as translate_main
from seq2seq.translate import translate_lines


def _raw_config(out_dir: Path, prepared: Path, corpus: Path, **train) -> dict:
    return toy_run_config(out_dir, prepared, corpus, **{"num_threads": 1, **train})


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus folder, prepared folder), prepared once for the module."""
    root = tmp_path_factory.mktemp("robust")
    write_toy_task(root / "corpus", n_train=120, n_valid=16)
    prepare(config_from_dict(_raw_config(root / "unused", root / "prepared", root / "corpus")))
    return root / "corpus", root / "prepared"


def _run(task, out_dir: Path, **train) -> dict:
    corpus, prepared = task
    return train_module.train(config_from_dict(_raw_config(out_dir, prepared, corpus, **train)))


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _assert_bit_identical(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


# ------------------------------------------------------------------ 1. kill -9 and resume exactly


# Run as a script in place of ``python -m seq2seq``: the same command line, except that every
# directory write announces its temp dir and sleeps once its files are written, before the
# checksums and the rename, so that the test can SIGKILL it exactly mid-write.
_PAUSING_LAUNCHER = """\
import sys, time
sys.path.insert(0, {root!r})  # the seq2seq this test imported, wherever the script lies
from seq2seq.__main__ import configure_process, main
configure_process()
from seq2seq import directory
add_checksums = directory.add_checksums
def paused(folder):
    print(f"checkpoint: paused mid-write {{folder}}", flush=True)
    time.sleep(60)
    add_checksums(folder)
directory.add_checksums = paused
sys.exit(main(sys.argv[1:]))
"""


class _Training:
    """``python -m seq2seq train`` in a subprocess, its merged output read line by line.

    With ``launcher`` (a script path), that script runs in place of ``-m seq2seq``.
    """

    def __init__(self, config_path: Path, launcher: Path | None = None) -> None:
        entry = [str(launcher)] if launcher else ["-m", "seq2seq"]
        command = [sys.executable, *entry, "train", str(config_path)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 120.0) -> re.Match:
        """Block until an output line matches ``pattern``; fail if the process ends first."""
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                self.process.kill()
                pytest.fail(f"no line matching {pattern!r} in {timeout} s:\n{self.output}")
            if line is None:
                pytest.fail(f"training ended before {pattern!r}:\n{self.output}")
            self.lines.append(line)
            if match := re.search(pattern, line):
                return match

    def finish(self, timeout: float = 120.0) -> int:
        code = self.process.wait(timeout=timeout)
        while (line := self._queue.get(timeout=timeout)) is not None:
            self.lines.append(line)
        return code

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _every_checkpoint_is_readable(out_dir: Path) -> int:
    """Load every step directory fully; return the newest step (0 when there is none)."""
    newest = 0
    for directory in step_dirs(out_dir):
        load_model(directory)  # checksums, config, tokenizer, weights
        state = load_trainer_state(directory)
        assert state["counters"]["step"] == int(directory.name.removeprefix("step_"))
        newest = state["counters"]["step"]
    return newest


@pytest.mark.slow
def test_killed_training_resumes_bit_identical(task, tmp_path):
    """SIGKILL at seeded random moments (once while a checkpoint is half written), SIGTERM once;
    every checkpoint on disk stays readable and the final weights equal an uninterrupted run's."""
    max_steps, settings = 22, dict(save_every=1, keep_last=2, log_every=1)
    straight = tmp_path / "straight"
    _run(task, straight, max_steps=max_steps, **settings)

    corpus, prepared = task
    run = tmp_path / "run"
    config_path = tmp_path / "run.yaml"
    raw = _raw_config(run, prepared, corpus, max_steps=max_steps, **settings)
    config_path.write_text(yaml.safe_dump(raw))
    pausing = tmp_path / "pausing_launcher.py"
    pausing.write_text(_PAUSING_LAUNCHER.format(root=str(Path(seq2seq.__file__).parents[1])))
    rng = random.Random(1234)
    stops = ["KILL", "KILL", "KILL mid-write", "KILL", "TERM", "KILL", "KILL"]
    step = resumes = 0
    for how in stops:
        training = _Training(config_path, pausing if how == "KILL mid-write" else None)
        try:
            if how == "KILL mid-write":
                tmp_dir = Path(training.wait_for(r"checkpoint: paused mid-write (\S+)").group(1))
                training.process.send_signal(signal.SIGKILL)
            else:
                target = min(step + rng.randint(1, 3), max_steps - 2)
                training.wait_for(rf"^update {target} \|")
                if how == "TERM":
                    training.process.send_signal(signal.SIGTERM)
                else:
                    threading.Event().wait(rng.uniform(0.0, 0.05))  # land anywhere after it
                    training.process.send_signal(signal.SIGKILL)
            code = training.finish()
        finally:
            training.process.kill()
        resumes += "resumed from" in training.output
        if how == "TERM":
            assert code == 0 and "stop requested" in training.output, training.output
        else:
            assert code == -signal.SIGKILL, training.output
        if how == "KILL mid-write":
            assert tmp_dir.is_dir() and ".tmp-" in tmp_dir.name  # the kill did land mid-write
        newest = _every_checkpoint_is_readable(run)
        assert newest >= step  # no saved progress is ever lost
        if how == "TERM":
            assert newest >= target  # the update in flight was finished and saved
        step = newest
    assert resumes >= len(stops) - 2  # the first run starts fresh; any other may too if killed
    final = _Training(config_path)
    assert final.finish(timeout=300) == 0, final.output
    assert "resumed from" in final.output
    last = run / "checkpoints" / f"step_{max_steps}"
    _assert_bit_identical(_weights(straight / "checkpoints" / f"step_{max_steps}"), _weights(last))
    moments = [load_trainer_state(d / "checkpoints" / f"step_{max_steps}") for d in (straight, run)]
    for a, b in zip(*(m["optimizer"]["state"].values() for m in moments)):
        assert all(torch.equal(a[key], b[key]) for key in a)
    leftovers = [
        p.name for p in (run / "checkpoints").iterdir() if re.search(r"\.(tmp|del)-", p.name)
    ]
    assert not leftovers  # stale temp dirs from the kills were cleaned up by later saves
    assert len(step_dirs(run)) == 2  # keep_last


# ------------------------------------------------------------------ 2. corrupt checkpoints


def test_bit_flip_and_truncation_are_detected_and_resume_falls_back(task, tmp_path, capsys):
    run = tmp_path / "run"
    _run(task, run, max_steps=4, save_every=1)
    flipped = run / "checkpoints" / "step_4" / "model.safetensors"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the tensor data: the file still parses
    flipped.write_bytes(bytes(data))
    truncated = run / "checkpoints" / "step_3" / "model.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    for path in (flipped, truncated):
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*corrupt"):
            load_model(path.parent)
    capsys.readouterr()
    with pytest.warns(UserWarning) as caught:
        result = _run(task, run, max_steps=5, save_every=1)
    skipped = " ".join(str(w.message) for w in caught)
    assert f"skipping checkpoint {flipped.parent}" in skipped and str(flipped) in skipped
    assert f"skipping checkpoint {truncated.parent}" in skipped
    assert f"resumed from {run / 'checkpoints' / 'step_2'} at update 2" in capsys.readouterr().out
    assert result["step"] == 5
    load_model(run / "checkpoints" / "step_5")


def test_a_prune_killed_midway_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    model, config, tokenizer = _tiny_checkpoint_parts()
    run = tmp_path / "run"
    for step in (1, 2):
        save_training_checkpoint(run, step, model, config, tokenizer, {"step": step}, keep_last=2)
    real_rmtree = checkpoint.shutil.rmtree

    def killed_after_one_file(path, ignore_errors=False):
        next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
        raise KeyboardInterrupt  # as if SIGKILL landed in the middle of the delete

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(run, 3, model, config, tokenizer, {"step": 3}, keep_last=2)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    assert [d.name for d in step_dirs(run)] == ["step_2", "step_3"]
    for directory in step_dirs(run):
        load_model(directory)
    assert [p.name for p in (run / "checkpoints").glob("step_1.del-*")]
    save_training_checkpoint(run, 4, model, config, tokenizer, {"step": 4}, keep_last=2)
    assert not list((run / "checkpoints").glob("*.del-*"))  # the leftover was cleaned up


# ------------------------------------------------------------------ 3. dirty corpora via the CLIs


def _dirty(folder: Path, case: str) -> tuple[dict, str]:
    """Write one kind of broken corpus; return data settings and the expected error pattern."""
    folder.mkdir(parents=True)
    good_de, good_en = "ab cd\nef\n", "CD AB\nEF\n"
    files = {"train.de": good_de, "train.en": good_en}
    data: dict = {}
    if case == "line counts":
        files["train.en"] += "GAB\n"
        expect = r"train\.de has 2 lines but \S+train\.en has 3"
    elif case == "invalid utf-8":
        files["train.en"] = b"CD AB\nEF \xff\xfe\n"
        expect = r"train\.en:2: invalid UTF-8"
    elif case == "empty file":
        files["train.de"] = ""
        expect = r"train\.de: file is empty"
    elif case == "missing file":
        del files["train.en"]
        expect = r"train\.en: file not found"
    elif case == "all lines empty":
        files = {"train.de": "\n\n", "train.en": "X\n\n"}
        expect = r"split 'train': no examples left of 2 after filtering"
    elif case == "jsonl field":
        files = {"train.jsonl": json.dumps({"de": "ab", "english": "AB"}) + "\n"}
        data = dict(format="jsonl", src_field="de", tgt_field="en")
        expect = r"train\.jsonl:1: no field 'en'.*\['de', 'english'\]"
    else:  # a local `datasets` folder whose records lack the configured column
        files = {"train.jsonl": json.dumps({"translation": {"de": "ab", "en": "AB"}}) + "\n"}
        data = dict(format="hf", src_field="text.de", tgt_field="translation.en")
        expect = r"no column 'text'; available columns: \['translation'\]"
    for name, content in files.items():
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(folder / name, mode) as handle:
            handle.write(content)
    return data, expect


@pytest.mark.parametrize(
    "case",
    ["line counts", "invalid utf-8", "empty file", "missing file", "all lines empty",
     "jsonl field", "datasets field"],
)  # fmt: skip
def test_dirty_corpora_give_one_clear_error_line(tmp_path, capsys, case):
    data, expect = _dirty(tmp_path / "corpus", case)
    raw = _raw_config(tmp_path / "run", tmp_path / "prepared", tmp_path / "corpus")
    raw["data"].update(data, max_source_len=16)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    for command, main in (("prepare", prepare_main), ("train", train_module.main)):
        assert main([str(config)]) == 2, command
        err = capsys.readouterr().err  # `datasets` may draw progress bars first
        assert err.splitlines()[-1].startswith(f"seq2seq {command}: error: "), err
        assert re.search(expect, err.splitlines()[-1]) and "Traceback" not in err, err


@pytest.mark.parametrize("truncate", [False, True])
def test_empty_and_overlong_lines_are_counted_and_reported(tmp_path, capsys, truncate):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.de").write_text("ab\n\ncd\n" + "x" * 40 + "\nef\n")
    (folder / "train.en").write_text("AB\nX\n\nY\nEF\n")
    raw = _raw_config(tmp_path / "run", tmp_path / "prepared", folder)
    raw["data"].update(max_source_len=16, valid_split="train", truncate=truncate)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert prepare_main([str(config)]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    stats = manifest["splits"]["train"]
    assert stats["dropped_empty"] == 2
    corpus = TokenizedCorpus(tmp_path / "prepared", "train")
    if truncate:
        assert "kept 3 of 5 examples; dropped 2 with an empty side and truncated 1 longer" in out
        assert stats["truncated"] == 1 and len(corpus) == 3
        assert sorted(corpus.src_lengths.tolist()) == [3, 3, 16]  # 15 x's + EOS
        long = int(corpus.src_lengths.argmax())
        assert len(corpus.source(long)) == 15 and len(corpus.target(long)) == 1
    else:
        assert "kept 2 of 5 examples; dropped 2 with an empty side and 1 longer than 16" in out
        assert stats["dropped_too_long"] == 1 and len(corpus) == 2


def test_train_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  max_stepz: 3\n")
    assert train_module.main([str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seq2seq train: error: ") and "train.max_stepz" in err


# ------------------------------------------------------------------ 4. non-finite values


def test_a_nonfinite_loss_skips_one_update_and_training_goes_on(task, tmp_path, monkeypatch):
    real_loss, calls = train_module.label_smoothed_nll, []

    def poisoned_once(logits, target, epsilon):
        calls.append(1)
        loss, nll, n_tokens = real_loss(logits, target, epsilon)
        return (loss * float("inf") if len(calls) == 2 else loss), nll, n_tokens

    monkeypatch.setattr(train_module, "label_smoothed_nll", poisoned_once)
    result = _run(task, tmp_path / "run", max_steps=3)
    assert result["step"] == 3 and result["nonfinite_updates"] == 1
    assert all(v.isfinite().all() for v in _weights(tmp_path / "run/checkpoints/step_3").values())


def test_repeated_nonfinite_losses_stop_with_a_message(task, tmp_path, monkeypatch, capsys):
    real_loss = train_module.label_smoothed_nll

    def poisoned(logits, target, epsilon):
        loss, nll, n_tokens = real_loss(logits, target, epsilon)
        return loss * float("nan"), nll, n_tokens

    monkeypatch.setattr(train_module, "label_smoothed_nll", poisoned)
    result = _run(task, tmp_path / "run", max_steps=50, save_every=1)
    assert result["step"] == 0
    limit = train_module.MAX_NONFINITE_IN_A_ROW
    assert f"stopped at update 0: {limit} non-finite losses in a row" in capsys.readouterr().out
    assert not (tmp_path / "run" / "checkpoints").exists()


def _tiny_checkpoint_parts():
    tokenizer = Tokenizer("char", CharVocab("abcdefgh "))
    config = RunConfig(model=ModelConfig(**{**TINY_MODEL, "dropout": 0.0}))
    torch.manual_seed(0)
    return build_model(config.model, tokenizer.vocab_size, tokenizer.vocab_size), config, tokenizer


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_are_never_saved(tmp_path, value):
    model, config, tokenizer = _tiny_checkpoint_parts()
    with torch.no_grad():
        model.encoder_layers[0].feed_forward.linear_in.weight[3, 5] = value
    with pytest.raises(CheckpointError, match=r"non-finite .*encoder_layers\.0\.feed_forward"):
        save_training_checkpoint(tmp_path / "run", 1, model, config, tokenizer, {"step": 1})
    assert step_dirs(tmp_path / "run") == []
    assert not list(tmp_path.rglob("*.tmp-*"))


# ------------------------------------------------------------------ 6. untrusted files run no code


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the file appears iff the pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_payload_in_trainer_state_is_refused_and_never_runs(task, tmp_path, capsys):
    model, config, tokenizer = _tiny_checkpoint_parts()
    run, marker = tmp_path / "run", tmp_path / "pwned"
    directory = save_training_checkpoint(run, 5, model, config, tokenizer, {"step": 5})
    state = directory / "trainer_state.pt"
    torch.save({"counters": {"step": 5}, "evil": _Payload(marker)}, state)
    # An attacker who can write the file can rewrite the checksums too.
    sums = json.loads((directory / "checksums.json").read_text())
    sums["trainer_state.pt"] = sha256_file(state)
    (directory / "checksums.json").write_text(json.dumps(sums))
    assert find_resume_checkpoint(run) == directory

    with pytest.raises(CheckpointError, match=re.escape(str(state)) + ": refused"):
        load_trainer_state(directory)
    corpus, prepared = task
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(_raw_config(run, prepared, corpus, max_steps=6)))
    assert train_module.main([str(config_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"seq2seq train: error: {state}: refused") and "Traceback" not in err
    assert not marker.exists()
    torch.load(state, weights_only=False)  # the control: the payload is real
    assert marker.exists()


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"train:\n  out_dir: !!python/object/apply:os.system ['touch {marker}']\n"
    (tmp_path / "run.yaml").write_text(evil)
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(tmp_path / "run.yaml")
    model, config, tokenizer = _tiny_checkpoint_parts()
    directory = save_checkpoint(tmp_path / "ckpt", model, config, tokenizer)
    (directory / "config.yaml").write_text(evil)
    with pytest.raises(CheckpointError, match=r"config\.yaml: cannot read config"):
        load_config_file(directory)
    assert not marker.exists()


# ------------------------------------------------------------------ 7. out of memory in training


def _oom_on(calls_to_fail):
    real_forward, calls = train_module._forward, []

    def forward(net, batch):
        if not net.training:  # validation: only training batches are made to fail
            return real_forward(net, batch)
        calls.append(1)
        if calls_to_fail == "all" or len(calls) in calls_to_fail:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_forward(net, batch)

    return forward


def test_out_of_memory_skips_the_batch_then_goes_on(task, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_module, "_forward", _oom_on({2, 3}))
    result = _run(task, tmp_path / "run", max_steps=3)
    assert result["step"] == 3 and result["oom_skipped"] == 2
    err = capsys.readouterr().err
    assert err.count("out of memory") == 2 and "update 2: out of memory" in err


def test_out_of_memory_every_time_gives_up(task, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_module, "_forward", _oom_on("all"))
    result = _run(task, tmp_path / "run", max_steps=50, save_every=1)
    limit = train_module.MAX_OOM_IN_A_ROW
    assert result["step"] == 0 and result["oom_skipped"] == limit
    assert f"{limit} out-of-memory errors in a row" in capsys.readouterr().out
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------ 8. determinism


def test_same_seed_same_bits_and_deterministic_flags(task, tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    real_forward, seen = train_module._forward, []

    def forward(net, batch):  # the flags as training sees them
        cudnn = torch.backends.cudnn
        flags = torch.are_deterministic_algorithms_enabled(), cudnn.deterministic
        seen.append((*flags, cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return real_forward(net, batch)

    monkeypatch.setattr(train_module, "_forward", forward)
    _run(task, tmp_path / "a", max_steps=3)
    assert set(seen) == {(False, False, False, None)}
    seen.clear()
    _run(task, tmp_path / "b", max_steps=3, deterministic=True)
    assert set(seen) == {(True, True, False, ":4096:8")}
    # Process-wide settings are the run's only: train() puts the previous ones back.
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    step = Path("checkpoints") / "step_3"
    _assert_bit_identical(_weights(tmp_path / "a" / step), _weights(tmp_path / "b" / step))


# ------------------------------------------------------------------ 5. translate never loses a line

SPLITLINES_BREAKS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # str.splitlines() breaks on these


@pytest.fixture
def one_thread():
    # Tiny models decode many small steps; more threads only add overhead on a busy machine.
    torch.set_num_threads(1)  # restored by _restore_torch_globals


@pytest.fixture(scope="module")
def translator(tmp_path_factory) -> Path:
    # The vocabulary holds line-break characters so that the model can emit them too.
    tokenizer = Tokenizer("char", CharVocab("abcdefghij .,\n\r\x85\u2028\x0bé中"))
    config = config_from_dict(
        {
            "model": dict(TINY_MODEL, dropout=0.0, max_positions=24),
            "data": {"tokenizer": "char"},
            "decode": {"beam_size": 2, "max_len_a": 1.0, "max_len_b": 5, "batch_tokens": 256},
        }
    )
    torch.manual_seed(1)
    model = build_model(config.model, tokenizer.vocab_size, tokenizer.vocab_size)
    return save_checkpoint(tmp_path_factory.mktemp("fuzz") / "model", model, config, tokenizer)


def _fuzz_lines(rng: random.Random) -> list[str]:
    alphabet = "abcdefghij .,é中ßΩж😀\t\x00\x07\x1b\x7f\ufeff\u200b\ufffd" + SPLITLINES_BREAKS
    lines = ["", " ", "\t", *SPLITLINES_BREAKS, "a\rb", "a\r", "x\u2028y\x85z", "\ud800 lone"]
    lines += ["".join(rng.choices(alphabet, k=rng.randint(0, 30))) for _ in range(40)]
    lines.append("".join(rng.choices("abcdefghij 中", k=100_000)))
    rng.shuffle(lines)
    return lines


def test_translate_function_fuzz_one_line_out_per_line_in(translator, one_thread):
    model, tokenizer, config = load_model(translator)
    lines = _fuzz_lines(random.Random(7))
    outputs = list(translate_lines(model, tokenizer, lines, config.decode))
    assert len(outputs) == len(lines)
    for line, output in zip(lines, outputs):
        assert output.splitlines() in ([output], []), repr(output)
        if not line.strip():
            assert output == ""
    assert list(translate_lines(model, tokenizer, [], config.decode)) == []


def test_translate_cli_fuzz_random_bytes(translator, one_thread, tmp_path):
    rng = random.Random(11)
    raw_lines = [bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))) for _ in range(40)]
    raw_lines = [line.replace(b"\n", b"") for line in raw_lines]
    texts = [line.encode() for line in _fuzz_lines(rng) if "\ud800" not in line]
    inputs = raw_lines + texts + [b"", b"\r", b"\xef\xbb\xbf", b"\xc3"]
    rng.shuffle(inputs)
    for name, payload in (
        ("fuzz", b"\n".join(inputs) + b"\n"),
        ("no-final-newline", b"\n".join(inputs)),
    ):
        (tmp_path / name).write_bytes(payload)
        out = tmp_path / f"{name}.out"
        args = ["--model", str(translator), "--input", str(tmp_path / name), "--output", str(out)]
        assert translate_main([*args, "--replace-invalid", "--device", "cpu"]) == 0
        written = out.read_bytes()
        assert written.count(b"\n") == len(inputs) and written.endswith(b"\n")
        for line in written.decode("utf-8").split("\n")[:-1]:
            assert not set(line) & set(SPLITLINES_BREAKS), repr(line)
    (tmp_path / "empty").write_bytes(b"")
    args = ["--model", str(translator), "--input", str(tmp_path / "empty")]
    assert translate_main([*args, "--output", str(tmp_path / "empty.out")]) == 0
    assert (tmp_path / "empty.out").read_bytes() == b""


def test_translate_cli_subprocess_stdin_keeps_every_line(translator):
    payload = "a\x85b\nc\u2028d\n\x0c\n\r\n" + "é" * 100_000 + "\n\n"
    result = subprocess.run(
        [sys.executable, "-m", "seq2seq", "translate", "--model", str(translator)],
        input=payload.encode(), capture_output=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.count(b"\n") == 6
    assert b"Traceback" not in result.stderr
