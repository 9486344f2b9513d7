#!/usr/bin/env bash
# The quick start: install into .venv if needed, train a small German -> English Transformer on
# CPU for a few minutes, translate the test set with beam search and print BLEU.
#
#   bash recipes/quickstart.sh
#
# Data, first that applies: $DATA (a Multi30k-style folder), $SEQ2SEQ_DATA/multi30k, the hub's
# bentrevett/multi30k when it answers within seconds, else a small German-English corpus generated
# here (recipes/tools/make_toy_corpus.py). The run itself is recipes/multi30k.sh with
# recipes/configs/multi30k_quick.yaml; its variables (OUT, MAX_MINUTES, AVERAGE, OVERRIDES,
# TEST_LINES, LENPEN_GRID, VALID_LINES, STAGE) apply. Defaults: OUT=runs/quickstart, MAX_MINUTES=5,
# AVERAGE=3, VALID_LINES=300.
# PYTHON=... uses that interpreter as it is, without installing anything.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/tools/stages.sh"  # for --help before the .venv is made
ROOT="$(dirname "$HERE")"

if [[ -z "${PYTHON:-}" ]]; then
    PYTHON="$ROOT/.venv/bin/python"
    if [[ ! -x "$PYTHON" ]]; then
        echo "+ python3 -m venv $ROOT/.venv"
        python3 -m venv "$ROOT/.venv"
    fi
    # Checked from / so that the checkout itself is not on sys.path.
    if ! (cd / && "$PYTHON" -c "import torch") 2>/dev/null; then
        echo "+ $PYTHON -m pip install torch==2.13.0"
        "$PYTHON" -m pip install torch==2.13.0
    fi
    if ! (cd / && "$PYTHON" -c "import seq2seq.train, seq2seq.evaluate") 2>/dev/null; then
        echo "+ $PYTHON -m pip install -e $ROOT"
        "$PYTHON" -m pip install -e "$ROOT"
    fi
fi
export PYTHON

export OUT="${OUT:-runs/quickstart}"
export MAX_MINUTES="${MAX_MINUTES:-5}"
export AVERAGE="${AVERAGE:-3}"
export VALID_LINES="${VALID_LINES:-300}"  # the length penalty chosen on 300 validation sentences
# A 2+2-layer, d_model 128 model that learns something in a few CPU minutes.
export CONFIG="${CONFIG:-$HERE/configs/multi30k_quick.yaml}"
EXTRA=""
if [[ -n "${DATA:-}" ]]; then
    echo "quickstart: data: $DATA (from DATA)"
elif [[ -n "${SEQ2SEQ_DATA:-}" && -d "$SEQ2SEQ_DATA/multi30k" ]]; then
    DATA="$SEQ2SEQ_DATA/multi30k"
    echo "quickstart: data: Multi30k from $DATA (from SEQ2SEQ_DATA)"
elif "$PYTHON" "$HERE/tools/hub_reachable.py" bentrevett/multi30k; then
    DATA=hub
    echo "quickstart: data: Multi30k from the Hugging Face hub (bentrevett/multi30k)"
else
    DATA="$OUT/toy_corpus"
    echo "quickstart: data: no Multi30k here and the hub is unreachable; using a generated"
    echo "quickstart: German-English caption corpus in $DATA (a smoke test: its scores are"
    echo "quickstart: not Multi30k's)"
    echo "+ $PYTHON $HERE/tools/make_toy_corpus.py $DATA"
    "$PYTHON" "$HERE/tools/make_toy_corpus.py" "$DATA"
    EXTRA="data.vocab_size=1000"  # ~150 word types: SentencePiece cannot make 3,000 pieces
fi
export DATA
export OVERRIDES="$EXTRA ${OVERRIDES:-}"

bash "$HERE/multi30k.sh"
echo "quickstart: model in $OUT/model, translations in $OUT/test.hyp"
"$PYTHON" -c "import json, sys
for label, path in (('cased', sys.argv[1]), ('lower-cased', sys.argv[2])):
    bleu = json.load(open(path))['bleu']
    print(f'quickstart: {label}: {bleu[\"text\"]}  ({bleu[\"signature\"]})')" \
    "$OUT/scores.json" "$OUT/scores.lc.json"
