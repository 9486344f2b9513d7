"""Choose the beam search's length penalty (GNMT alpha) on a development set, by sacreBLEU.

    python recipes/tools/choose_length_penalty.py --model OUT/model \
        --source OUT/valid.src --ref OUT/valid.ref --grid 0.6 1.0 1.5 2.0 --out OUT/lenpen.json

Translates the sources once per alpha with the model's other decoding settings (beam, length
limit), scores each output with cased sacreBLEU against the references, prints one line per alpha
and writes ``{"chosen": alpha, "scores": [...], "signature": ...}`` to ``--out``. The chosen alpha
is the highest-scoring one; a tie goes to the alpha listed first. A recipe then translates its
test set with ``--lenpen`` set to the choice, so the test set is decoded once.

Why a recipe needs this: the best alpha depends on how far the model trained. At the Multi30k
recipe's 25-minute budget an AMX machine's model (~3,000 updates) scored best on validation at
2.0, while an AVX2 machine's (~600-800 updates) repeated phrases at 2.0 and needs less.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from seq2seq.api import Translator
from seq2seq.config import ConfigError
from seq2seq.directory import CheckpointError
from seq2seq.evaluate import EvaluateError, read_aligned, score
from seq2seq.textio import atomic_write_text


def choose(bleu_by_alpha: list[tuple[float, float]]) -> float:
    """The alpha of the highest BLEU; the first listed among equals."""
    best_alpha, best_bleu = bleu_by_alpha[0]
    for alpha, bleu in bleu_by_alpha[1:]:
        if bleu > best_bleu:
            best_alpha, best_bleu = alpha, bleu
    return best_alpha


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--source", required=True, help="development sources, one per line")
    parser.add_argument("--ref", required=True, help="their references, one per line")
    parser.add_argument("--grid", nargs="+", type=float, required=True, help="alphas to try")
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    args = parser.parse_args(argv)
    bad = [alpha for alpha in args.grid if not math.isfinite(alpha) or alpha < 0]
    if bad:
        parser.error(f"--grid: {bad[0]} is not a finite number >= 0")
    try:
        sources, refs = read_aligned(args.source, args.ref)
        translator = Translator.load(args.model, device=args.device)
        rows, signature = [], ""
        for alpha in args.grid:
            start = time.perf_counter()
            hyps = translator.translate(sources, length_penalty=alpha)
            bleu = score(hyps, [refs], ("bleu",))["bleu"]
            signature = str(bleu["signature"])
            seconds = time.perf_counter() - start
            rows.append({"alpha": alpha, "bleu": bleu["score"], "text": bleu["text"]})
            print(f"choose_length_penalty: alpha {alpha:g}: {bleu['text']} ({seconds:.1f} s)")
    except (CheckpointError, ConfigError, EvaluateError, OSError, ValueError) as error:
        print(f"choose_length_penalty: error: {error}", file=sys.stderr)
        return 2
    chosen = choose([(row["alpha"], row["bleu"]) for row in rows])
    result = {"chosen": chosen, "scores": rows, "signature": signature, "sentences": len(sources)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.out), json.dumps(result, indent=1) + "\n")
    print(
        f"choose_length_penalty: chosen alpha {chosen:g} on {len(sources)} sentences -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
