"""seq2seq: a small, paper-faithful PyTorch toolkit for sequence-to-sequence learning.

The modules follow the data flow: config -> tokenizer/data -> model -> train -> checkpoint ->
search/translate/sample -> evaluate. The names below are the public API.

Each name is imported from its module on first use (PEP 562), so ``import seq2seq`` loads no
submodule and no torch, changes no environment variable, and ``python -m seq2seq.translate`` does
not find its own module already imported by the package. The ``TYPE_CHECKING`` block below gives
type checkers and editors the same names as plain imports (go-to-definition works).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from seq2seq.api import LanguageModel, Translator
    from seq2seq.average import average_checkpoints
    from seq2seq.checkpoint import CheckpointError, load_model, save_checkpoint
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
    from seq2seq.data import Batch, DataError, TokenizedCorpus, batch_indices, collate
    from seq2seq.evaluate import score
    from seq2seq.hf_import import import_model
    from seq2seq.loss import label_smoothed_nll
    from seq2seq.model import GPT, Transformer, build_model
    from seq2seq.search import beam_search, greedy
    from seq2seq.tokenizer import Tokenizer, train_tokenizer
    from seq2seq.translate import translate_lines

# public name -> the module that defines it; the same names as __all__ (tests/test_package.py)
_MODULE_OF = {
    "LanguageModel": "seq2seq.api",
    "Translator": "seq2seq.api",
    "average_checkpoints": "seq2seq.average",
    "CheckpointError": "seq2seq.checkpoint",
    "load_model": "seq2seq.checkpoint",
    "save_checkpoint": "seq2seq.checkpoint",
    "PRESETS": "seq2seq.config",
    "ConfigError": "seq2seq.config",
    "DataConfig": "seq2seq.config",
    "DecodeConfig": "seq2seq.config",
    "ModelConfig": "seq2seq.config",
    "RunConfig": "seq2seq.config",
    "TrainConfig": "seq2seq.config",
    "load_config": "seq2seq.config",
    "Batch": "seq2seq.data",
    "DataError": "seq2seq.data",
    "TokenizedCorpus": "seq2seq.data",
    "batch_indices": "seq2seq.data",
    "collate": "seq2seq.data",
    "score": "seq2seq.evaluate",
    "import_model": "seq2seq.hf_import",
    "label_smoothed_nll": "seq2seq.loss",
    "GPT": "seq2seq.model",
    "Transformer": "seq2seq.model",
    "build_model": "seq2seq.model",
    "beam_search": "seq2seq.search",
    "greedy": "seq2seq.search",
    "Tokenizer": "seq2seq.tokenizer",
    "train_tokenizer": "seq2seq.tokenizer",
    "translate_lines": "seq2seq.translate",
}

__all__ = [
    "GPT",
    "PRESETS",
    "Batch",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "DataError",
    "DecodeConfig",
    "LanguageModel",
    "ModelConfig",
    "RunConfig",
    "TokenizedCorpus",
    "Tokenizer",
    "TrainConfig",
    "Transformer",
    "Translator",
    "average_checkpoints",
    "batch_indices",
    "beam_search",
    "build_model",
    "collate",
    "greedy",
    "import_model",
    "label_smoothed_nll",
    "load_config",
    "load_model",
    "save_checkpoint",
    "score",
    "train_tokenizer",
    "translate_lines",
]


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'seq2seq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
