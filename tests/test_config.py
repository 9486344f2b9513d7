"""Config loading, overrides, validation and every shipped YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from seq2seq.config import ConfigError, RunConfig, load_config, save_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_paper_base_model():
    config = load_config()
    assert (config.model.d_model, config.model.n_heads, config.model.d_ff) == (512, 8, 2048)
    assert config.model.norm_first is False and config.model.positions == "sinusoidal"
    assert config.train.adam_betas == (0.9, 0.98) and config.train.adam_eps == 1e-9
    assert config.train.warmup_steps == 4000 and config.train.label_smoothing == 0.1


def test_yaml_preset_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  preset: transformer_big\n  dropout: 0.2\ntrain:\n  lr: 2\n")
    config = load_config(
        path, ["train.max_steps=7", "train.adam_eps=1e-8", "data.joint_vocab=true"]
    )
    assert config.model.d_model == 1024 and config.model.n_heads == 16
    assert config.model.dropout == 0.2  # explicit key wins over the preset
    assert config.train.lr == 2.0 and isinstance(config.train.lr, float)
    assert config.train.max_steps == 7 and config.train.adam_eps == 1e-8


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_stepz=3", "train.max_stepz: unknown key"),
        ("model.d_model=wide", "model.d_model: expected an integer"),
        ("model.norm_first=1", "model.norm_first: expected true or false"),
        ("train.adam_betas=[0.9]", "train.adam_betas: expected a list of 2"),
        ("model.preset=huge", "model.preset: unknown preset"),
        ("model.n_heads=7", "divisible by model.n_heads"),
        ("train.precision=fp8", "train.precision"),
        ("nonsense", "not of the form"),
        ("optimizer.lr=1", "optimizer: unknown key"),
        ("data.subword_alpha=1.0", "data.subword_alpha must lie in"),
        ("data.subword_alpha=-0.1", "data.subword_alpha must lie in"),
    ],
)
def test_bad_values_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.tokenizer=char"], "needs a SentencePiece tokenizer.*tokenizer=char"),
        (["data.format=lm", "model.preset=gpt_shakespeare"], "needs a SentencePiece.*format=lm"),
        (["data.subword_samples=0"], "data.subword_samples must be >= 1"),
    ],
)
def test_subword_sampling_needs_sentencepiece_parallel_data_and_samples(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.subword_alpha=0.1", *overrides])
    load_config(None, overrides)  # the same settings are fine without sampling


def test_unknown_yaml_key_names_its_path(tmp_path):
    path = write(tmp_path, "data:\n  max_token: 100\n")
    with pytest.raises(ConfigError, match="data.max_token: unknown key"):
        load_config(path)


def test_save_and_reload_round_trip(tmp_path):
    config = load_config(None, ["model.preset=transformer_small", "train.max_steps=11"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert isinstance(config, RunConfig)


def test_yaml_is_read_safely(tmp_path):
    path = write(tmp_path, "train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)


def test_every_shipped_config_loads():
    paths = sorted(CONFIG_DIR.glob("*.yaml"))
    assert paths, "recipes/configs holds no YAML"
    for path in paths:
        config = load_config(path)
        config.validate()


def test_precision_defaults_to_auto_and_save_keeps_a_comment(tmp_path):
    config = load_config()
    assert config.train.precision == "auto"
    note = "precision: auto -> fp32 (CPU without native bf16: avx2)"
    save_config(config, tmp_path / "config.yaml", {"train.precision": note})
    text = (tmp_path / "config.yaml").read_text()
    assert f"  precision: auto  # {note}\n" in text
    assert load_config(tmp_path / "config.yaml") == config  # the comment is only a comment


@pytest.mark.parametrize(
    "override",
    [
        "decode.length_penalty=nan",
        "decode.max_len_a=inf",
        "decode.temperature=-1",
        "decode.max_len_b=-2",
    ],
)
def test_decode_settings_must_be_finite_and_non_negative(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key):
        config_from_dict_with([override])


def config_from_dict_with(overrides):
    from seq2seq.config import config_from_dict
    from seq2seq.yamlconfig import apply_override

    raw: dict = {}
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw)
