"""Tokenized, compound-split BLEU: how the Transformer paper's WMT14 en-de numbers were measured.

    python recipes/tools/paper_bleu.py --hyp test.hyp --ref test.ref [--tokenize 13a] [--json]

Vaswani et al. (2017) report 27.3 (base) and 28.4 (big) as tensor2tensor's ``get_ende_bleu.sh``
computes them: Moses-tokenize hypotheses and references, then split hyphenated compounds,
``perl -ple 's{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g'``, then ``multi-bleu.perl`` (case-sensitive,
on the tokens as they are). This script does the same with sacreBLEU: tokenize with sacreBLEU's
``13a`` (default; keeps word-internal hyphens, like Moses without ``-a``) or ``intl`` tokenizer,
apply that regular expression to both sides, and score with ``tokenize="none"``. The number is
comparable with the paper's, not with detokenized sacreBLEU: quote it labelled as
"tokenized, compound-split BLEU", next to the sacreBLEU score and its signature.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from sacrebleu.tokenizers.tokenizer_intl import TokenizerV14International

TOKENIZERS = {"13a": Tokenizer13a, "intl": TokenizerV14International}
_COMPOUND = re.compile(r"(\S)-(\S)")


def split_compounds(tokenized: str) -> str:
    """tensor2tensor's ``##AT##`` convention: ``Ost-West`` -> ``Ost ##AT##-##AT## West``.

    Like the Perl one-liner, matches do not overlap: ``a-b-c`` -> ``a ##AT##-##AT## b-c``.
    """
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", tokenized)


def paper_bleu(
    hyps: Sequence[str], refs: Sequence[str], tokenize: str = "13a"
) -> dict[str, float | str]:
    """Tokenized, compound-split, case-sensitive corpus BLEU with a signature saying so."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    tokenizer = TOKENIZERS[tokenize]()
    hyps_split = [split_compounds(tokenizer(line.strip())) for line in hyps]
    refs_split = [split_compounds(tokenizer(line.strip())) for line in refs]
    metric = BLEU(tokenize="none", force=True)
    result = metric.corpus_score(hyps_split, [refs_split])
    signature = f"{metric.get_signature()}|pretok:{tokenize}|compound-split:##AT##"
    return {"score": result.score, "signature": signature, "text": str(result)}


def _lines(path: str) -> list[str]:
    return Path(path).read_text(encoding="utf-8").splitlines()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hyp", required=True, help="detokenized hypotheses, one per line")
    parser.add_argument("--ref", required=True, help="detokenized references, one per line")
    parser.add_argument("--tokenize", choices=sorted(TOKENIZERS), default="13a")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    args = parser.parse_args(argv)
    try:
        result = paper_bleu(_lines(args.hyp), _lines(args.ref), args.tokenize)
    except (OSError, ValueError) as error:
        print(f"paper_bleu: error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"bleu_tokenized_compound_split": result}, indent=1))
    else:
        print(f"tokenized compound-split {result['text']}\t{result['signature']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
