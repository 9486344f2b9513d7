"""Character language models side by side with the two baselines that need no training.

    python recipes/tools/lm_baselines.py CONFIG.yaml [section.key=value ...] \
        --score gpt=OUT/scores.json --score bigram=OUT/bigram/scores.json

Prints, in nats per character on the validation text: the uniform guess ``ln V`` (V = distinct
characters of the training split), the unigram entropy (the entropy of the character
frequencies of the training split: the loss of a model that ignores all context), then each
``seq2seq evaluate --json`` result named by ``--score NAME=FILE``. The training split is the text
minus its last ``data.valid_fraction``, exactly what training reads with ``data.tokenizer=char``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

from seq2seq.config import ConfigError, load_config
from seq2seq.data import DataError
from seq2seq.readers import read_lm_text


def baselines(train_text: str) -> dict[str, float]:
    """``uniform`` (ln of the number of distinct characters) and ``unigram`` (entropy of their
    frequencies), in nats."""
    counts = Counter(train_text)
    total = sum(counts.values())
    return {
        "uniform": math.log(len(counts)),
        "unigram": -sum(c / total * math.log(c / total) for c in counts.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="run config (YAML) naming the text")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--score", action="append", default=[], metavar="NAME=FILE",
                        help="a seq2seq evaluate --json result (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        data = load_config(args.config, args.overrides).data
        if data.format != "lm" or data.tokenizer != "char":
            raise ConfigError("data.format=lm with data.tokenizer=char is needed (characters)")
        text = read_lm_text(data)
        train_text = text[: len(text) - int(len(text) * data.valid_fraction)]
        rows = baselines(train_text)
        n_chars = len(set(train_text))
        labels = {"uniform": f"uniform (ln {n_chars})", "unigram": "unigram (train frequencies)"}
        for spec in args.score:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                parser.error(f"--score {spec!r} is not NAME=FILE")
            try:
                rows[name] = float(json.loads(Path(path).read_text())["perplexity"]["nll"])
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise DataError(f"{path}: not a seq2seq evaluate --json result ({error})") from None
    except (ConfigError, DataError) as error:
        print(f"lm_baselines: error: {error}", file=sys.stderr)
        return 2
    print(f"{'model':<30} {'nats/char':>9} {'perplexity':>10}")
    for name, nll in rows.items():
        print(f"{labels.get(name, name):<30} {nll:>9.3f} {math.exp(nll):>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
