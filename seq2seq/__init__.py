"""seq2seq: a small, paper-faithful PyTorch toolkit for sequence-to-sequence learning."""

from seq2seq.config import (
    PRESETS,
    ConfigError,
    DataConfig,
    DecodeConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    load_config,
)
from seq2seq.model import GPT, Transformer, build_model

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "PRESETS",
    "ConfigError",
    "DataConfig",
    "DecodeConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "Transformer",
    "build_model",
    "load_config",
]
