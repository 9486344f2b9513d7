#!/usr/bin/env bash
# Multi30k task 1 (Elliott et al. 2016) on CPU: German -> English by default, SRC=en TGT=de flips
# it. A small Transformer (recipes/configs/multi30k.yaml) trains under a wall-clock budget with
# precision auto (bf16 where the CPU computes it natively, else fp32), the last checkpoints are
# averaged, the length penalty is chosen on the validation set, test2016 (Flickr) is translated
# with beam search and scored with sacreBLEU, cased and lower-cased.
#
#   DATA=../shared/data/multi30k bash recipes/multi30k.sh      # a local folder
#   bash recipes/multi30k.sh                                   # the hub: bentrevett/multi30k
#
# Variables [defaults]:
#   DATA         folder with {train,val,test_2016_flickr}.{de,en} (plain or .gz), or "hub";
#                [$SEQ2SEQ_DATA/multi30k when SEQ2SEQ_DATA is set, else the hub]
#   OUT          run directory [runs/multi30k_$SRC-$TGT]
#   SRC, TGT     languages [de, en]
#   MAX_MINUTES  training budget in minutes [25]
#   AVERAGE      newest checkpoints to average (all if fewer were saved) [10]
#   TEST_LINES   translate only the first N test sentences, 0 = all [0]
#   LENPEN_GRID  length penalties (GNMT alpha) to try on the validation set; the best by cased
#                BLEU decodes the test set. Empty: the config's decode.length_penalty [0.6 1 1.5 2]
#   VALID_LINES  choose the length penalty on the first N validation sentences, 0 = all [0]
#   OVERRIDES    extra section.key=value settings for prepare and train, e.g. "train.max_steps=300"
#   CONFIG       run config [recipes/configs/multi30k.yaml; quickstart.sh: multi30k_quick.yaml]
#   STAGE        start at this stage and redo it and every later one [continue where it stopped]
#   PYTHON       interpreter [the repository's .venv/bin/python, else python3]
#
# Leaves: $OUT/model (averaged model directory), $OUT/test.hyp (detokenized translations),
# $OUT/scores.json (BLEU, chrF, TER with signatures), $OUT/scores.lc.json (lower-cased BLEU),
# $OUT/length_penalty.json (validation BLEU per length penalty, and the one chosen).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/tools/stages.sh"  # run_stage, PY (the interpreter), default_data
CONFIG="${CONFIG:-$HERE/configs/multi30k.yaml}"

SRC="${SRC:-de}"
TGT="${TGT:-en}"
OUT="${OUT:-runs/multi30k_$SRC-$TGT}"
MAX_MINUTES="${MAX_MINUTES:-25}"
AVERAGE="${AVERAGE:-10}"
TEST_LINES="${TEST_LINES:-0}"
LENPEN_GRID="${LENPEN_GRID-0.6 1.0 1.5 2.0}"
VALID_LINES="${VALID_LINES:-0}"
read -r -a GRID <<< "$LENPEN_GRID"
read -r -a EXTRA <<< "${OVERRIDES:-}"
DATA="$(default_data multi30k)"

if [[ "$DATA" == "hub" ]]; then
    TEST_SPLIT=test
    VALID_SPLIT=validation
    CORPUS=(data.format=hf data.path=bentrevett/multi30k data.src_field="$SRC"
        data.tgt_field="$TGT" data.valid_split=validation data.test_split=test)
else
    TEST_SPLIT=test_2016_flickr
    VALID_SPLIT=val
    CORPUS=(data.format=text data.path="$DATA")
fi
SETTINGS=("${CORPUS[@]}" data.src_lang="$SRC" data.tgt_lang="$TGT" train.out_dir="$OUT")
echo "multi30k: $SRC -> $TGT, data: $DATA, run directory: $OUT, budget: $MAX_MINUTES min"

run_stage 0 prepare \
    "$PY" -m seq2seq.prepare "$CONFIG" "${SETTINGS[@]}" "${EXTRA[@]}"
run_stage 1 train \
    "$PY" -m seq2seq.train "$CONFIG" "${SETTINGS[@]}" train.max_minutes="$MAX_MINUTES" "${EXTRA[@]}"
run_stage 2 average \
    "$PY" -m seq2seq.average --replace --out "$OUT/model" --last "$AVERAGE" "$OUT"
run_stage 3 test-text \
    "$PY" "$HERE/tools/export_split.py" "$CONFIG" "${SETTINGS[@]}" "${EXTRA[@]}" \
    --split "$TEST_SPLIT" \
    --source "$OUT/test.src" --target "$OUT/test.ref" --max-lines "$TEST_LINES"
run_stage 4 valid-text \
    "$PY" "$HERE/tools/export_split.py" "$CONFIG" "${SETTINGS[@]}" "${EXTRA[@]}" \
    --split "$VALID_SPLIT" \
    --source "$OUT/valid.src" --target "$OUT/valid.ref" --max-lines "$VALID_LINES"
LENPEN=()
if ((${#GRID[@]})); then
    run_stage 5 length-penalty \
        "$PY" "$HERE/tools/choose_length_penalty.py" --model "$OUT/model" \
        --source "$OUT/valid.src" --ref "$OUT/valid.ref" --grid "${GRID[@]}" \
        --out "$OUT/length_penalty.json"
    # The tool writes '"chosen": ALPHA,' as the JSON object's first line.
    CHOSEN="$(sed -n 's/^ "chosen": \(.*\),$/\1/p' "$OUT/length_penalty.json")"
    if [[ -z "$CHOSEN" ]]; then
        echo "multi30k: $OUT/length_penalty.json names no chosen length penalty" >&2
        exit 2
    fi
    LENPEN=(--lenpen "$CHOSEN")
fi
run_stage 6 translate \
    "$PY" -m seq2seq.translate --model "$OUT/model" --input "$OUT/test.src" --output "$OUT/test.hyp" \
    "${LENPEN[@]}"
run_stage 7 evaluate --stdout "$OUT/scores.json" \
    "$PY" -m seq2seq.evaluate --hyp "$OUT/test.hyp" --ref "$OUT/test.ref" --metrics bleu,chrf,ter \
    --json
run_stage 8 evaluate-lowercase --stdout "$OUT/scores.lc.json" \
    "$PY" -m seq2seq.evaluate --hyp "$OUT/test.hyp" --ref "$OUT/test.ref" --metrics bleu \
    --lowercase --json
