"""Test helpers shared by the training tests (not fixtures: plain functions and constants).

The toy task is tiny on purpose: a two-layer, 32-wide Transformer on a character vocabulary
learns it within a few dozen updates on one CPU thread.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

TINY_MODEL = dict(
    d_model=32, n_heads=2, d_ff=64, n_encoder_layers=1, n_decoder_layers=1, max_positions=64
)
# No log lines, validations or checkpoints before a test asks for them.
QUIET = dict(log_every=1000, eval_every=1000, save_every=1000, keep_last=0)
TOY_WORDS = ("ab", "cd", "ef", "gab", "hic", "dee", "fa")


def write_toy_task(
    folder: Path,
    n_train: int,
    n_valid: int,
    words: tuple[str, ...] = TOY_WORDS,
    reverse: bool = True,
) -> None:
    """``{train,val}.{de,en}`` of a seeded toy translation task: each target is its source in
    upper case, with the word order reversed when ``reverse``."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", n_train), ("val", n_valid)):
        sources = [" ".join(rng.choices(words, k=rng.randint(1, 4))) for _ in range(size)]
        targets = [" ".join(s.split()[:: -1 if reverse else 1]).upper() for s in sources]
        (folder / f"{split}.de").write_text("\n".join(sources) + "\n")
        (folder / f"{split}.en").write_text("\n".join(targets) + "\n")


def toy_run_config(out_dir: Path, prepared: Path, corpus: Path, **train: Any) -> dict:
    """The raw config (a dict, for ``config_from_dict`` or a YAML file) of a quiet run of
    :data:`TINY_MODEL` on the toy task; ``train`` keys override the train section."""
    return {
        "model": dict(TINY_MODEL, dropout=0.1),
        "data": dict(path=str(corpus), tokenizer="char", max_source_len=64, max_target_len=64),
        "prepare": dict(out_dir=str(prepared), num_workers=1),
        "batch": dict(max_tokens=96),
        "train": {**QUIET, "out_dir": str(out_dir), "lr": 3e-3, "warmup_steps": 4, **train},
    }
