"""seq2seq: a small, paper-faithful PyTorch toolkit for sequence-to-sequence learning.

The modules follow the data flow: config -> tokenizer/data -> model -> train -> checkpoint ->
search/translate/sample -> evaluate. The names below are the public API.
"""

from seq2seq.checkpoint import CheckpointError, average_checkpoints, load_model, save_checkpoint
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
from seq2seq.data import Batch, DataError, TokenizedCorpus, batch_indices, collate, prepare
from seq2seq.evaluate import score
from seq2seq.loss import label_smoothed_nll
from seq2seq.model import GPT, Transformer, build_model
from seq2seq.search import beam_search, greedy
from seq2seq.tokenizer import Tokenizer, train_tokenizer
from seq2seq.translate import translate_lines

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "PRESETS",
    "Batch",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DataError",
    "DecodeConfig",
    "ModelConfig",
    "RunConfig",
    "TokenizedCorpus",
    "Tokenizer",
    "TrainConfig",
    "Transformer",
    "average_checkpoints",
    "batch_indices",
    "beam_search",
    "build_model",
    "collate",
    "greedy",
    "label_smoothed_nll",
    "load_config",
    "load_model",
    "prepare",
    "save_checkpoint",
    "score",
    "train_tokenizer",
    "translate_lines",
]
