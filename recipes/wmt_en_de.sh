#!/usr/bin/env bash
# WMT14 English -> German (SRC=de TGT=en: German -> English, the other half of WMT14) as in
# "Attention Is All You Need" (Vaswani et al. 2017): a joint ~37k SentencePiece BPE vocabulary,
# Transformer base (BIG=1: big) trained with torchrun on every
# visible GPU at ~25,000 source + 25,000 target tokens per update, warmup 4000, 100k updates
# (big: 300k), the last 5 checkpoints averaged (big: 20), newstest2014 translated with beam 4 and
# length penalty 0.6, and scored with sacreBLEU (signature) and, labelled as such, the paper's
# tokenized compound-split BLEU (recipes/tools/paper_bleu.py).
#
#   bash recipes/wmt_en_de.sh                     # data from the hub: datasets "wmt14", "de-en"
#   SRC=de TGT=en bash recipes/wmt_en_de.sh       # German -> English
#   BIG=1 NGPU=8 bash recipes/wmt_en_de.sh
#   DATA=/data/wmt14_en_de bash recipes/wmt_en_de.sh
#
# Variables [defaults]:
#   DATA         folder with {train,newstest2013,newstest2014}.{en,de} (plain or .gz), or "hub";
#                [$SEQ2SEQ_DATA/wmt14_en_de when it exists, else the hub]
#   SRC, TGT     languages, en and de either way round [en, de]
#   OUT          run directory [runs/wmt_${SRC}_${TGT}_base, or runs/wmt_${SRC}_${TGT}_big]
#   BIG          1: transformer_big (recipes/configs/wmt_en_de_big.yaml) [0]
#   NGPU         processes (GPUs) per node [every visible GPU: torch.cuda.device_count()]
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node torchrun rendezvous [1 node]; run
#                the script on every node; each prepares the data into its own OUT (with a
#                shared OUT, start the others once node 0 has finished stage 0); only node 0
#                goes on after training
#   PRECISION    auto, bf16, fp16 or fp32 [auto: bf16 where native, fp16 on GPUs without it]
#   TOKENS_PER_UPDATE  source (and target) tokens per update, padding included [25000]
#   GPU_TOKENS   most tokens in one GPU batch [8192]; update_freq makes up the rest
#   AVERAGE      newest checkpoints to average (all if fewer were saved) [5, big: 20]
#   MAX_STEPS    updates [100000, big: 300000]
#   TEST_LINES, OVERRIDES, STAGE, PYTHON   as in recipes/multi30k.sh
#
# Leaves: $OUT/model, $OUT/test.hyp, $OUT/scores.json (sacreBLEU BLEU and chrF with signatures),
# $OUT/scores.paper.json (tokenized compound-split BLEU, comparable with the paper's 27.3 / 28.4;
# for TGT=de only: the compound splitting is German's).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/tools/stages.sh"  # run_stage, PY (the interpreter), default_data

SRC="${SRC:-en}"
TGT="${TGT:-de}"
if [[ "$SRC-$TGT" != en-de && "$SRC-$TGT" != de-en ]]; then
    echo "wmt_en_de: error: SRC=$SRC TGT=$TGT: WMT14 here is en-de or de-en" >&2
    exit 2
fi
if [[ "${BIG:-0}" == 1 ]]; then
    CONFIG="$HERE/configs/wmt_en_de_big.yaml"
    OUT="${OUT:-runs/wmt_${SRC}_${TGT}_big}"
    AVERAGE="${AVERAGE:-20}"
    MAX_STEPS="${MAX_STEPS:-300000}"
else
    CONFIG="$HERE/configs/wmt_en_de.yaml"
    OUT="${OUT:-runs/wmt_${SRC}_${TGT}_base}"
    AVERAGE="${AVERAGE:-5}"
    MAX_STEPS="${MAX_STEPS:-100000}"
fi
NGPU="$(torchrun_processes wmt_en_de "$PY")"
NNODES="${NNODES:-1}"
PRECISION="${PRECISION:-auto}"
TOKENS_PER_UPDATE="${TOKENS_PER_UPDATE:-25000}"
GPU_TOKENS="${GPU_TOKENS:-8192}"
TEST_LINES="${TEST_LINES:-0}"
read -r -a EXTRA <<< "${OVERRIDES:-}"

# ~TOKENS_PER_UPDATE per update: world x max_tokens x update_freq, with max_tokens <= GPU_TOKENS.
WORLD=$((NGPU * NNODES))
UPDATE_FREQ=$(((TOKENS_PER_UPDATE + WORLD * GPU_TOKENS - 1) / (WORLD * GPU_TOKENS)))
MAX_TOKENS=$(((TOKENS_PER_UPDATE + WORLD * UPDATE_FREQ - 1) / (WORLD * UPDATE_FREQ)))
if ((NNODES > 1)); then
    LAUNCH=(--nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK for multi-node runs}"
        --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}")
else
    LAUNCH=(--standalone)
fi

DATA="$(default_data wmt14_en_de)"
if [[ "$DATA" == "hub" ]]; then
    TEST_SPLIT=test  # newstest2014; validation is newstest2013
    CORPUS=()
else
    TEST_SPLIT=newstest2014
    CORPUS=(data.format=text data.path="$DATA" data.valid_split=newstest2013
        data.test_split=newstest2014)
fi
# The hub's rows hold both languages ("translation.en", "translation.de"); a folder, both files.
SETTINGS=("${CORPUS[@]}" data.src_lang="$SRC" data.tgt_lang="$TGT"
    data.src_field="translation.$SRC" data.tgt_field="translation.$TGT" train.out_dir="$OUT")
TRAIN=(batch.max_tokens="$MAX_TOKENS" train.update_freq="$UPDATE_FREQ"
    train.precision="$PRECISION" train.max_steps="$MAX_STEPS")
echo "wmt_en_de: $SRC -> $TGT, $(basename "$CONFIG"), data: $DATA, run directory: $OUT"
echo "wmt_en_de: $WORLD processes x max_tokens $MAX_TOKENS x update_freq $UPDATE_FREQ" \
    "= $((WORLD * MAX_TOKENS * UPDATE_FREQ)) tokens per update, $PRECISION"

run_stage 0 prepare \
    "$PY" -m seq2seq.prepare "$CONFIG" "${SETTINGS[@]}" "${EXTRA[@]}"
run_stage 1 train \
    "$PY" -m torch.distributed.run "${LAUNCH[@]}" --nproc_per_node "$NGPU" -m seq2seq.train \
    "$CONFIG" "${SETTINGS[@]}" "${TRAIN[@]}" "${EXTRA[@]}"
if ((NNODES > 1 && NODE_RANK > 0)); then
    echo "wmt_en_de: node $NODE_RANK is done; node 0 averages, translates and scores"
    exit 0
fi
run_stage 2 average \
    "$PY" -m seq2seq.average --replace --out "$OUT/model" --last "$AVERAGE" "$OUT"
run_stage 3 test-text \
    "$PY" "$HERE/tools/export_split.py" "$CONFIG" "${SETTINGS[@]}" "${EXTRA[@]}" \
    --split "$TEST_SPLIT" \
    --source "$OUT/test.src" --target "$OUT/test.ref" --max-lines "$TEST_LINES"
run_stage 4 translate \
    "$PY" -m seq2seq.translate --model "$OUT/model" --input "$OUT/test.src" \
    --output "$OUT/test.hyp" --beam 4 --lenpen 0.6
run_stage 5 evaluate --stdout "$OUT/scores.json" \
    "$PY" -m seq2seq.evaluate --hyp "$OUT/test.hyp" --ref "$OUT/test.ref" --metrics bleu,chrf \
    --json
if [[ "$TGT" == de ]]; then
    run_stage 6 paper-bleu --stdout "$OUT/scores.paper.json" \
        "$PY" "$HERE/tools/paper_bleu.py" --hyp "$OUT/test.hyp" --ref "$OUT/test.ref" --json
fi
