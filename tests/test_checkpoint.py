"""Checkpoint directories: round trip, atomic writes, checksums, resume; averaging and its CLI."""

from __future__ import annotations

import errno
import json
import os
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from seq2seq import average, checkpoint
from seq2seq.average import average_checkpoints
from seq2seq.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_resume_checkpoint,
    load_model,
    load_trainer_state,
    read_pointer,
    restore_rng_state,
    save_checkpoint,
    save_training_checkpoint,
    step_dirs,
)
from seq2seq.config import FORMAT_VERSION, ConfigError, ModelConfig, RunConfig, TrainConfig
from seq2seq.model import build_model
from seq2seq.tokenizer import CharVocab, Tokenizer


def _config(**model) -> RunConfig:
    shape = dict(d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1)
    return RunConfig(model=ModelConfig(**{**shape, **model}), train=TrainConfig(out_dir="unused"))


def _tokenizer() -> Tokenizer:
    return Tokenizer("char", CharVocab("abcdefgh "))


def _model(config: RunConfig, seed: int = 0):
    torch.manual_seed(seed)
    vocab = _tokenizer().vocab_size
    return build_model(config.model, vocab, vocab)


def _state(step: int) -> dict:
    return {"step": step, "rng": capture_rng_state(), "best": 1.5}


def test_round_trip_restores_weights_tokenizer_and_config(tmp_path):
    config = _config(share_embeddings=True)
    model = _model(config)
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model  # as torch.compile wraps it: the prefix must not reach disk
    save_checkpoint(tmp_path / "ckpt", wrapped, config, _tokenizer(), _state(7))
    names = set(load_file(str(tmp_path / "ckpt" / "model.safetensors")))
    assert not any(n.startswith(("_orig_mod.", "module.")) for n in names)
    loaded, tokenizer, loaded_config = load_model(tmp_path / "ckpt")
    assert loaded_config == config
    assert tokenizer.encode_source("bad cafe") == _tokenizer().encode_source("bad cafe")
    original = model.state_dict()
    restored = loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    # Tied matrices stay one tensor after loading.
    assert loaded.source_embedding is loaded.target_embedding
    assert not loaded.training
    state = load_trainer_state(tmp_path / "ckpt")
    assert state["step"] == 7 and state["best"] == 1.5


def test_corrupt_or_missing_file_is_named(tmp_path):
    config = _config()
    directory = save_checkpoint(tmp_path / "ckpt", _model(config), config, _tokenizer())
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        load_model(directory)
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors.*missing"):
        load_model(directory)


def test_crash_mid_write_leaves_previous_checkpoints_intact(tmp_path, monkeypatch):
    config = _config()
    model = _model(config)
    out = tmp_path / "run"
    first = save_training_checkpoint(out, 1, model, config, _tokenizer(), _state(1))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_training_checkpoint(out, 2, model, config, _tokenizer(), _state(2))
    monkeypatch.undo()
    assert step_dirs(out) == [first]
    assert read_pointer(out, "last") == first
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]
    # A temp directory left by a killed process (no cleanup ran) is never taken for a checkpoint.
    (out / "checkpoints" / "step_9.tmp-abcd").mkdir()
    (out / "checkpoints" / "step_9.tmp-abcd" / "model.safetensors").write_bytes(b"partial")
    assert find_resume_checkpoint(out) == first
    assert load_trainer_state(first)["step"] == 1


def test_resume_falls_back_past_corrupt_checkpoint(tmp_path):
    config = _config()
    model = _model(config)
    out = tmp_path / "run"
    for step in (10, 20, 30):
        save_training_checkpoint(out, step, model, config, _tokenizer(), _state(step))
    newest = out / "checkpoints" / "step_30" / "trainer_state.pt"
    newest.write_bytes(newest.read_bytes()[:-10])
    (out / "checkpoints" / "step_20" / "checksums.json").unlink()
    with pytest.warns(UserWarning) as record:
        found = find_resume_checkpoint(out)
    assert found == out / "checkpoints" / "step_10"
    messages = " ".join(str(w.message) for w in record)
    assert "step_30" in messages and "step_20" in messages
    assert find_resume_checkpoint(tmp_path / "empty") is None


def test_keep_last_prunes_but_never_best(tmp_path):
    config = _config()
    model = _model(config)
    out = tmp_path / "run"
    for step in range(1, 6):
        save_training_checkpoint(
            out, step, model, config, _tokenizer(), _state(step), is_best=step == 2, keep_last=2
        )
    assert [p.name for p in step_dirs(out)] == ["step_2", "step_4", "step_5"]
    assert read_pointer(out, "best").name == "step_2"
    assert read_pointer(out, "last").name == "step_5"


def test_saving_over_an_existing_directory_replaces_it(tmp_path):
    config = _config()
    save_checkpoint(tmp_path / "m", _model(config, seed=1), config, _tokenizer(), _state(1))
    save_checkpoint(tmp_path / "m", _model(config, seed=2), config, _tokenizer())
    assert not (tmp_path / "m" / "trainer_state.pt").exists()
    listed = json.loads((tmp_path / "m" / "checksums.json").read_text())
    assert "trainer_state.pt" not in listed and "tokenizer/tokenizer.json" in listed
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_average_equals_mean_of_weights(tmp_path):
    config = _config()
    models = [_model(config, seed=s) for s in range(3)]
    dirs = [
        save_checkpoint(tmp_path / f"c{i}", m, config, _tokenizer()) for i, m in enumerate(models)
    ]
    average_checkpoints(dirs, tmp_path / "avg")
    averaged, tokenizer, loaded_config = load_model(tmp_path / "avg")
    assert loaded_config == config and tokenizer.vocab_size == _tokenizer().vocab_size
    states = [m.state_dict() for m in models]
    for name, tensor in averaged.state_dict().items():
        expected = (states[0][name] + states[1][name] + states[2][name]) / 3
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-7)
    assert not (tmp_path / "avg" / "trainer_state.pt").exists()


def test_average_cli_last_k(tmp_path, capsys):
    config = _config()
    out = tmp_path / "run"
    models = [_model(config, seed=s) for s in range(3)]
    for step, model in enumerate(models, start=1):
        save_training_checkpoint(out, step * 100, model, config, _tokenizer(), _state(step))
    assert average.main(["--out", str(tmp_path / "avg"), "--last", "2", str(out)]) == 0
    captured = capsys.readouterr()
    assert "step_200" in captured.out and "step_100" not in captured.out
    assert captured.err == ""  # K found: no warning
    averaged, _, _ = load_model(tmp_path / "avg")
    weights = dict(averaged.named_parameters())
    name = next(n for n in weights if weights[n].dim() == 2 and "embedding" not in n)
    expected = (models[1].state_dict()[name] + models[2].state_dict()[name]) / 2
    torch.testing.assert_close(weights[name].detach(), expected, rtol=0, atol=1e-7)

    # Fewer than K (a run cut short by its time budget): all of them, with a warning.
    assert average.main(["--out", str(tmp_path / "avg5"), "--last", "5", str(out)]) == 0
    captured = capsys.readouterr()
    assert "averaged 3 checkpoints" in captured.out
    assert (
        "warning" in captured.err and "found 3 checkpoint(s), fewer than --last 5" in captured.err
    )
    averaged, _, _ = load_model(tmp_path / "avg5")
    states = [m.state_dict() for m in models]
    for name, tensor in averaged.state_dict().items():
        expected = (states[0][name] + states[1][name] + states[2][name]) / 3
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-7)


def test_average_cli_fails_clearly_without_checkpoints(tmp_path, capsys):
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    for argv in (
        ["--last", "3", str(tmp_path / "empty")],
        ["--last", "3", str(tmp_path / "missing")],
    ):
        with pytest.raises(SystemExit) as exit_info:
            average.main(["--out", str(tmp_path / "avg"), *argv])
        assert exit_info.value.code == 2
        assert "no checkpoints" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        average.main(["--out", str(tmp_path / "avg"), "--last", "0", str(tmp_path / "empty")])
    assert "--last must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "avg").exists()
    # a directory that is not a checkpoint: a user error, exit code 2 like the other commands
    assert average.main(["--out", str(tmp_path / "avg"), str(tmp_path / "empty")]) == 2
    assert "seq2seq average: error:" in capsys.readouterr().err


def test_load_for_inference_applies_decode_overrides_and_resolves_device(tmp_path):
    config = _config()
    directory = save_checkpoint(tmp_path / "m", _model(config), config, _tokenizer())
    overrides = {"beam_size": 2, "length_penalty": None, "top_k": 7}
    model, tokenizer, loaded, device = checkpoint.load_for_inference(directory, "cpu", overrides)
    assert device == "cpu" and not model.training
    assert next(model.parameters()).device.type == "cpu"
    assert tokenizer.vocab_size == _tokenizer().vocab_size
    assert loaded.decode.beam_size == 2 and loaded.decode.top_k == 7
    assert loaded.decode.length_penalty == config.decode.length_penalty  # None: not given
    assert replace(loaded, decode=config.decode) == config  # nothing else changed
    _, _, _, auto = checkpoint.load_for_inference(directory, "auto")
    assert auto == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="decode.beam: no such decode setting"):
        checkpoint.load_for_inference(directory, "cpu", {"beam": 2})
    with pytest.raises(ConfigError, match="top_p"):
        checkpoint.load_for_inference(directory, "cpu", {"top_p": 1.5})


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    torch.save({"rng": capture_rng_state()}, tmp_path / "state.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)
    restore_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[0] == again[0] and expected[1] == again[1]
    assert torch.equal(expected[2], again[2])


def test_newer_format_version_is_refused(tmp_path):
    config = _config()
    directory = save_checkpoint(tmp_path / "ckpt", _model(config), config, _tokenizer())
    text = (directory / "config.yaml").read_text()
    (directory / "config.yaml").write_text(
        text.replace(f"format_version: {FORMAT_VERSION}", "format_version: 99")
    )
    with pytest.raises(CheckpointError, match="config.yaml: format_version 99 is newer"):
        checkpoint.load_config_file(directory)


def test_average_refuses_checkpoints_of_different_models_or_tokenizers(tmp_path):
    """Same tensor shapes are not enough: 2 vs 4 heads, or another vocabulary of the same size."""
    config = _config()
    first = save_checkpoint(tmp_path / "a", _model(config), config, _tokenizer())
    four_heads = _config(n_heads=4)
    other = save_checkpoint(tmp_path / "b", _model(four_heads), four_heads, _tokenizer())
    with pytest.raises(CheckpointError, match="model.n_heads"):
        average_checkpoints([first, other], tmp_path / "avg")
    letters = Tokenizer("char", CharVocab("ijklmnop "))  # same size, other pieces
    relabelled = save_checkpoint(tmp_path / "c", _model(config), config, letters)
    with pytest.raises(CheckpointError, match="tokenizer/"):
        average_checkpoints([first, relabelled], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


def test_a_failed_pointer_write_keeps_the_old_pointer_and_leaves_no_temporary(
    tmp_path, monkeypatch
):
    config = _config()
    first = save_training_checkpoint(tmp_path, 1, _model(config), config, _tokenizer(), _state(1))
    second = checkpoint.save_checkpoint(
        tmp_path / "checkpoints" / "step_2", _model(config), config, _tokenizer(), _state(2)
    )

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)  # the data never reaches the disk
    with pytest.raises(OSError, match="No space left"):
        checkpoint.write_pointer(tmp_path, "last", second)
    monkeypatch.undo()
    assert read_pointer(tmp_path, "last") == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "last", "step_1", "step_2",
    ]  # fmt: skip
