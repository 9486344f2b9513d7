"""Import a Hugging Face Marian or GPT-2 directory as one of our model directories.

    seq2seq import --from marian --model opus-mt-de-en --out runs/opus-de-en
    seq2seq import --from gpt2 --model gpt2 --out runs/gpt2

``--model`` is a local directory (``save_pretrained`` output, e.g. a downloaded hub snapshot);
nothing is fetched from the hub. The result holds ``model.safetensors``, ``config.yaml`` (a full
run config: train it further with ``train.init_from``), ``tokenizer/`` and ``checksums.json``, and
computes the same function as the Hugging Face model (:mod:`seq2seq.hf_convert` explains how).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seq2seq.config import RunConfig
from seq2seq.hf_convert import HFImportError, import_gpt2, import_marian
from seq2seq.tokenizer import Tokenizer, TokenizerError

SOURCES = ("marian", "gpt2")
IMPORTERS: dict[str, Callable[[Path], tuple[Any, Tokenizer, RunConfig]]] = {
    "marian": import_marian,
    "gpt2": import_gpt2,
}


def import_model(source: str, hf_dir: str | Path, out: str | Path) -> Path:
    """Import ``hf_dir`` (``source``: ``marian`` or ``gpt2``) into the new model directory ``out``.

    Raises:
        HFImportError: see :func:`~seq2seq.hf_convert.import_marian` and
            :func:`~seq2seq.hf_convert.import_gpt2`, or an unknown source.
        CheckpointError: ``out`` exists or lies inside ``hf_dir``, or cannot be written.
    """
    from seq2seq.checkpoint import check_new_output, save_checkpoint

    if source not in IMPORTERS:
        raise HFImportError(f"--from {source!r}: not one of {list(IMPORTERS)}")
    out = check_new_output(out, [hf_dir], "--out")
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise HFImportError(f"--model {hf_dir}: not a directory")
    model, tokenizer, config = IMPORTERS[source](hf_dir)
    return save_checkpoint(out, model, config, tokenizer)


def main(argv: list[str] | None = None) -> int:
    """``seq2seq import --from marian|gpt2 --model HF_DIR --out MODEL_DIR``."""
    parser = argparse.ArgumentParser(
        prog="seq2seq import",
        description="Import a local Hugging Face MarianMTModel or GPT-2 directory as a seq2seq "
        "model directory (same function; nothing is downloaded).",
    )
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES)
    parser.add_argument("--model", required=True, help="the Hugging Face directory to read")
    parser.add_argument("--out", required=True, help="model directory to create (must not exist)")
    args = parser.parse_args(argv)
    from seq2seq.checkpoint import CheckpointError

    try:
        out = import_model(args.source, args.model, args.out)
    except (HFImportError, CheckpointError, TokenizerError) as error:
        print(f"seq2seq import: error: {error}", file=sys.stderr)
        return 2
    print(f"import: {args.model} ({args.source}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
