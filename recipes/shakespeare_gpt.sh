#!/usr/bin/env bash
# GPT mode: a character-level decoder-only Transformer on tiny Shakespeare
# (recipes/configs/shakespeare_gpt.yaml, nanoGPT's CPU setting) and the bigram baseline
# (recipes/configs/shakespeare_bigram.yaml: the previous character alone), trained by the same
# loop on the same blocks and evaluated the same way. Prints the validation loss while training,
# a sample, and at the end both models' held-out loss beside the uniform (ln V) and unigram
# figures.
#
#   SEQ2SEQ_DATA=../shared/data bash recipes/shakespeare_gpt.sh
#   OVERRIDES="model.preset=gpt_shakespeare model.max_positions=256 batch.block_size=256 \
#     batch.batch_size=64 train.processes=1 train.max_steps=5000" bash recipes/shakespeare_gpt.sh  # 1 GPU
#
# Variables [defaults]:
#   DATA         folder with input.txt [$SEQ2SEQ_DATA/tinyshakespeare]
#   OUT          run directory [runs/shakespeare_gpt]
#   MAX_MINUTES  training budget in minutes, 0 = none [0: the config's 2,000 updates]
#   PROMPT       text the sample starts from [ROMEO:]
#   OVERRIDES, STAGE, PYTHON   as in recipes/multi30k.sh (OVERRIDES apply to the GPT)
#   BIGRAM_OVERRIDES           extra settings for the bigram [none]
#
# Leaves: $OUT/model (the last checkpoint as a model directory), $OUT/valid.txt (held-out text),
# $OUT/scores.json (its perplexity), $OUT/sample.txt, the same for the bigram under $OUT/bigram/,
# and $OUT/compare.txt (the side-by-side table).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/tools/stages.sh"  # run_stage, PY (the interpreter), default_data
CONFIG="$HERE/configs/shakespeare_gpt.yaml"
BIGRAM_CONFIG="$HERE/configs/shakespeare_bigram.yaml"

DATA="${DATA:-${SEQ2SEQ_DATA:?set DATA (folder with input.txt) or SEQ2SEQ_DATA}/tinyshakespeare}"
OUT="${OUT:-runs/shakespeare_gpt}"
MAX_MINUTES="${MAX_MINUTES:-0}"
PROMPT="${PROMPT:-ROMEO:}"
read -r -a EXTRA <<< "${OVERRIDES:-}"
read -r -a BIGRAM_EXTRA <<< "${BIGRAM_OVERRIDES:-}"
SETTINGS=(data.path="$DATA/input.txt" train.out_dir="$OUT")
BIGRAM_SETTINGS=(data.path="$DATA/input.txt" train.out_dir="$OUT/bigram")
echo "shakespeare_gpt: data: $DATA/input.txt, run directory: $OUT"

run_stage 0 prepare \
    "$PY" -m seq2seq.prepare "$CONFIG" "${SETTINGS[@]}" "${EXTRA[@]}"
run_stage 1 train \
    "$PY" -m seq2seq.train "$CONFIG" "${SETTINGS[@]}" train.max_minutes="$MAX_MINUTES" "${EXTRA[@]}"
run_stage 2 model \
    "$PY" -m seq2seq.average --replace --out "$OUT/model" --last 1 "$OUT"
run_stage 3 valid-text \
    "$PY" "$HERE/tools/export_split.py" "$CONFIG" "${SETTINGS[@]}" "${EXTRA[@]}" --split valid \
    --source "$OUT/valid.txt"
run_stage 4 perplexity --stdout "$OUT/scores.json" \
    "$PY" -m seq2seq.evaluate --model "$OUT/model" --text "$OUT/valid.txt" --json
run_stage 5 sample --stdout "$OUT/sample.txt" \
    "$PY" -m seq2seq.sample --model "$OUT/model" --prompt "$PROMPT" --seed 1
run_stage 6 bigram-train \
    "$PY" -m seq2seq.train "$BIGRAM_CONFIG" "${BIGRAM_SETTINGS[@]}" "${BIGRAM_EXTRA[@]}"
run_stage 7 bigram-model \
    "$PY" -m seq2seq.average --replace --out "$OUT/bigram/model" --last 1 "$OUT/bigram"
run_stage 8 bigram-perplexity --stdout "$OUT/bigram/scores.json" \
    "$PY" -m seq2seq.evaluate --model "$OUT/bigram/model" --text "$OUT/valid.txt" --json
run_stage 9 compare --stdout "$OUT/compare.txt" \
    "$PY" "$HERE/tools/lm_baselines.py" "$CONFIG" "${SETTINGS[@]}" "${EXTRA[@]}" \
    --score gpt="$OUT/scores.json" --score bigram="$OUT/bigram/scores.json"
