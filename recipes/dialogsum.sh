#!/usr/bin/env bash
# DialogSum dialogue summarization (Chen et al. 2021) on CPU, from the local files: a small
# Transformer (recipes/configs/dialogsum.yaml) trains on the dev dialogues (the last 50 held out
# for validation loss), the last checkpoints are averaged, the 500 test dialogues are summarized
# with beam search (trigram blocking) and scored with ROUGE against all three references.
#
#   SEQ2SEQ_DATA=../shared/data bash recipes/dialogsum.sh
#
# Variables [defaults]:
#   DATA         folder with dialogsum.{dev,test}.jsonl [$SEQ2SEQ_DATA/dialogsum]
#   OUT          run directory [runs/dialogsum]
#   MAX_MINUTES  training budget in minutes [15]
#   AVERAGE      newest checkpoints to average (all if fewer were saved) [3]
#   TEST_LINES, OVERRIDES, STAGE, PYTHON   as in recipes/multi30k.sh
#
# Leaves: $OUT/corpus/{train,valid,test}.jsonl, $OUT/model, $OUT/test.hyp (one summary per
# line) and $OUT/scores.json (ROUGE-1/2/L/Lsum F1 with its signature).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/tools/stages.sh"  # run_stage, PY (the interpreter), default_data
CONFIG="$HERE/configs/dialogsum.yaml"

DATA="${DATA:-${SEQ2SEQ_DATA:?set DATA (dialogsum.dev.jsonl folder) or SEQ2SEQ_DATA}/dialogsum}"
OUT="${OUT:-runs/dialogsum}"
MAX_MINUTES="${MAX_MINUTES:-15}"
AVERAGE="${AVERAGE:-3}"
TEST_LINES="${TEST_LINES:-0}"
read -r -a EXTRA <<< "${OVERRIDES:-}"
SETTINGS=(data.path="$OUT/corpus" train.out_dir="$OUT")
echo "dialogsum: data: $DATA, run directory: $OUT, budget: $MAX_MINUTES min"

run_stage 0 corpus \
    "$PY" "$HERE/tools/dialogsum_data.py" "$DATA" "$OUT/corpus" --valid 50
run_stage 1 prepare \
    "$PY" -m seq2seq.prepare "$CONFIG" "${SETTINGS[@]}" "${EXTRA[@]}"
run_stage 2 train \
    "$PY" -m seq2seq.train "$CONFIG" "${SETTINGS[@]}" train.max_minutes="$MAX_MINUTES" "${EXTRA[@]}"
run_stage 3 average \
    "$PY" -m seq2seq.average --replace --out "$OUT/model" --last "$AVERAGE" "$OUT"
run_stage 4 test-text \
    "$PY" "$HERE/tools/export_split.py" "$CONFIG" "${SETTINGS[@]}" "${EXTRA[@]}" \
    --split test \
    --source "$OUT/test.src" --target "$OUT/test.ref1" --reference "summary2=$OUT/test.ref2" \
    --reference "summary3=$OUT/test.ref3" --max-lines "$TEST_LINES"
run_stage 5 summarize \
    "$PY" -m seq2seq.translate --model "$OUT/model" --input "$OUT/test.src" --output "$OUT/test.hyp"
run_stage 6 evaluate --stdout "$OUT/scores.json" \
    "$PY" -m seq2seq.evaluate --hyp "$OUT/test.hyp" --ref "$OUT/test.ref1" "$OUT/test.ref2" \
    "$OUT/test.ref3" --metrics rouge --json
