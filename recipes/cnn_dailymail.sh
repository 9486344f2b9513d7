#!/usr/bin/env bash
# CNN/DailyMail 3.0.0 abstractive summarization on GPU (recipes/configs/cnn_dailymail.yaml):
# Transformer base, articles truncated to 512 pieces, torchrun on every visible GPU, the last
# checkpoints averaged, test articles summarized with beam 4, a minimum length, trigram blocking
# and a length penalty, and scored with ROUGE-1/2/L/Lsum.
#
#   bash recipes/cnn_dailymail.sh                 # data from the hub: datasets "cnn_dailymail"
#
# Variables [defaults]:
#   DATA         "hub", or a local folder of {train,validation,test}.jsonl with fields article
#                and highlights (the hub's layout) [$SEQ2SEQ_DATA/cnn_dailymail if it exists]
#   OUT          run directory [runs/cnn_dailymail]
#   NGPU         processes (GPUs) [every visible GPU]
#   PRECISION    auto, bf16, fp16 or fp32 [auto: bf16 where native, fp16 on GPUs without it]
#   AVERAGE      newest checkpoints to average (all if fewer were saved) [5]
#   TEST_LINES, OVERRIDES, STAGE, PYTHON   as in recipes/multi30k.sh
#
# Leaves: $OUT/model, $OUT/test.hyp (one summary per line), $OUT/scores.json (ROUGE).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/tools/stages.sh"  # run_stage, PY (the interpreter), default_data
CONFIG="$HERE/configs/cnn_dailymail.yaml"

OUT="${OUT:-runs/cnn_dailymail}"
NGPU="$(torchrun_processes cnn_dailymail "$PY")"
PRECISION="${PRECISION:-auto}"
AVERAGE="${AVERAGE:-5}"
TEST_LINES="${TEST_LINES:-0}"
read -r -a EXTRA <<< "${OVERRIDES:-}"
DATA="$(default_data cnn_dailymail)"
CORPUS=()
if [[ "$DATA" != "hub" ]]; then
    CORPUS=(data.path="$DATA" data.hf_config=)  # datasets reads a folder of jsonl files by split
fi
SETTINGS=("${CORPUS[@]}" train.out_dir="$OUT")
echo "cnn_dailymail: data: $DATA, run directory: $OUT, $NGPU processes, $PRECISION"

run_stage 0 prepare \
    "$PY" -m seq2seq.prepare "$CONFIG" "${SETTINGS[@]}" "${EXTRA[@]}"
run_stage 1 train \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m seq2seq.train \
    "$CONFIG" "${SETTINGS[@]}" train.precision="$PRECISION" "${EXTRA[@]}"
run_stage 2 average \
    "$PY" -m seq2seq.average --replace --out "$OUT/model" --last "$AVERAGE" "$OUT"
run_stage 3 test-text \
    "$PY" "$HERE/tools/export_split.py" "$CONFIG" "${SETTINGS[@]}" "${EXTRA[@]}" \
    --split test \
    --source "$OUT/test.src" --target "$OUT/test.ref" --max-lines "$TEST_LINES"
run_stage 4 summarize \
    "$PY" -m seq2seq.translate --model "$OUT/model" --input "$OUT/test.src" --output "$OUT/test.hyp"
run_stage 5 evaluate --stdout "$OUT/scores.json" \
    "$PY" -m seq2seq.evaluate --hyp "$OUT/test.hyp" --ref "$OUT/test.ref" --metrics rouge --json
