"""The ``seq2seq`` command: ``seq2seq SUBCOMMAND ...`` runs ``python -m seq2seq.MODULE ...``."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Each module exposes ``main(argv) -> int``.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("seq2seq.data", "tokenize and binarize a corpus once"),
    "average": ("seq2seq.checkpoint", "average checkpoints into a model directory"),
    "train": ("seq2seq.train", "train a model from a YAML config with key=value overrides"),
    "translate": ("seq2seq.translate", "translate text line by line with beam search"),
    "sample": ("seq2seq.sample", "generate text from a GPT model directory"),
    "evaluate": ("seq2seq.evaluate", "BLEU/chrF/TER/ROUGE with signatures, or perplexity"),
    "export": ("seq2seq.export", "export a model directory to Hugging Face MarianMTModel"),
    "serve": ("seq2seq.serve", "serve model directories over HTTP, with a page at /"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = ["usage: seq2seq SUBCOMMAND [ARGS ...]", "", "subcommands:"]
        lines += [f"  {name:<10} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
        print(
            "\n".join(lines),
            file=sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr,
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nseq2seq: unknown subcommand {argv[0]!r}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module_name, _ = SUBCOMMANDS[argv[0]]
    module = importlib.import_module(module_name)
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
