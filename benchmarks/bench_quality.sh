#!/usr/bin/env bash
# Translation quality at a fixed wall-clock budget, ours or Hugging Face's: Multi30k test2016
# (Flickr), sacreBLEU cased (with its signature) and lower-cased, plus the updates trained, the
# wall time and the training stage's peak RSS.
#
#   SEQ2SEQ_DATA=/path/to/shared/data bash benchmarks/bench_quality.sh            # ours, 25 min
#   SEQ2SEQ_DATA=/path/to/shared/data IMPL=hf bash benchmarks/bench_quality.sh    # the HF peer
#   SEQ2SEQ_DATA=... MAX_MINUTES=1 TEST_LINES=50 bash benchmarks/bench_quality.sh # smoke test
#   REPORT=1 IMPL=hf bash benchmarks/bench_quality.sh       # print the figures of a finished run
#
# IMPL=ours runs recipes/multi30k.sh as it is (recipes/configs/multi30k.yaml: transformer_small,
# bf16, 4,096-token batches, checkpoint averaging, beam 5 with the GNMT length penalty chosen on
# the validation set); each of its stages runs through a small wrapper ($OUT/bench/python) that
# appends the stage's wall time and peak RSS (ru_maxrss of the child) to $OUT/bench/stages.jsonl.
# IMPL=hf runs benchmarks/bench_quality_hf.py: the same network as a MarianMTModel trained by
# Seq2SeqTrainer on the same prepared data and scored the same way (its docstring lists what is
# matched and what HF cannot match). Both share the prepared data in
# benchmarks/.cache/quality/data_$SRC-$TGT (one such folder per set of data.* OVERRIDES). The
# figures come from bench_quality_hf.py --report, which reads either kind of run directory.
#
# Variables [defaults]:
#   SEQ2SEQ_DATA shared data folder holding multi30k/ [required, unless DATA is set]
#   DATA         the folder with {train,val,test_2016_flickr}.{de,en}.gz [$SEQ2SEQ_DATA/multi30k]
#   IMPL         ours | hf [ours]
#   SRC, TGT     languages [de, en]
#   MAX_MINUTES  training budget in minutes [25]
#   AVERAGE      checkpoints to average [10, as recipes/multi30k.sh]
#   TEST_LINES   score only the first N test sentences, 0 = all 1,000 [0]
#   LENPEN_GRID  length penalties (GNMT alpha) both choose from on the validation set; empty:
#                the config's [0.6 1.0 1.5 2.0]
#   VALID_LINES  choose on the first N validation sentences, 0 = all 1,014 [0]
#   OUT          run directory [benchmarks/.cache/quality/${IMPL}_$SRC-$TGT]
#   FRESH        1: delete an earlier run in $OUT first (only a directory this script made) [0]
#   REPORT       1: do not run, only print the figures of the finished run in $OUT [0]
#   JSON         also write the figures to this file [none]
#   OVERRIDES    extra section.key=value settings for both implementations [none]
#   CONFIG       run config [recipes/configs/multi30k.yaml]
#   PYTHON       interpreter [the repository's .venv/bin/python, else python3]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
source "$ROOT/recipes/tools/stages.sh"  # default_python, shell_words; OMP_WAIT_POLICY=PASSIVE
PY="$(default_python "$ROOT")"

IMPL="${IMPL:-ours}"
SRC="${SRC:-de}"
TGT="${TGT:-en}"
MAX_MINUTES="${MAX_MINUTES:-25}"
AVERAGE="${AVERAGE:-10}"
TEST_LINES="${TEST_LINES:-0}"
LENPEN_GRID="${LENPEN_GRID-0.6 1.0 1.5 2.0}"
VALID_LINES="${VALID_LINES:-0}"
read -r -a GRID <<< "$LENPEN_GRID"
CONFIG="${CONFIG:-$ROOT/recipes/configs/multi30k.yaml}"
OUT="$(realpath -m "${OUT:-$HERE/.cache/quality/${IMPL}_$SRC-$TGT}")"
PREPARED="$HERE/.cache/quality/data_$SRC-$TGT"
read -r -a EXTRA <<< "${OVERRIDES:-}"
for SETTING in "${EXTRA[@]}"; do  # data.* overrides change the prepared data: keep it apart
    if [[ "$SETTING" == data.* ]]; then
        PREPARED+="_${SETTING//[^A-Za-z0-9.=_-]/_}"
    fi
done
JSON_ARGS=()
if [[ -n "${JSON:-}" ]]; then JSON_ARGS=(--json "$JSON"); fi
export HF_HUB_OFFLINE=1

if [[ "${REPORT:-0}" == 1 ]]; then
    exec "$PY" "$HERE/bench_quality_hf.py" --report "$OUT" "${JSON_ARGS[@]}"
fi
if [[ "$IMPL" != ours && "$IMPL" != hf ]]; then
    echo "bench_quality: IMPL must be ours or hf, got '$IMPL'" >&2
    exit 2
fi
if [[ -z "${DATA:-}" ]]; then
    if [[ -z "${SEQ2SEQ_DATA:-}" ]]; then
        echo "bench_quality: set SEQ2SEQ_DATA to the shared data folder (the one holding" \
            "multi30k/), or DATA to the Multi30k folder itself" >&2
        exit 2
    fi
    DATA="$SEQ2SEQ_DATA/multi30k"
fi
if [[ ! -d "$DATA" ]]; then
    echo "bench_quality: $DATA is not a folder (DATA or \$SEQ2SEQ_DATA/multi30k)" >&2
    exit 2
fi
if [[ -e "$OUT" ]]; then
    if [[ "${FRESH:-0}" == 1 && -f "$OUT/bench/run.json" ]]; then
        echo "bench_quality: FRESH=1: deleting the earlier run $OUT"
        rm -rf "$OUT"
    elif [[ "${FRESH:-0}" == 1 ]]; then
        echo "bench_quality: $OUT was not made by this script; move it away yourself" >&2
        exit 2
    else
        echo "bench_quality: $OUT holds an earlier run: REPORT=1 prints its figures, FRESH=1" \
            "deletes it and measures again" >&2
        exit 2
    fi
fi
mkdir -p "$OUT/bench"
echo "bench_quality: $IMPL, $SRC -> $TGT, budget $MAX_MINUTES min, run directory $OUT"
"$PY" -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
    impl "$IMPL" src "$SRC" tgt "$TGT" max_minutes "$MAX_MINUTES" average "$AVERAGE" \
    test_lines "$TEST_LINES" config "$CONFIG" > "$OUT/bench/run.json"  # marks $OUT as made here
DATA_SETTINGS=(data.format=text data.path="$DATA" data.src_lang="$SRC" data.tgt_lang="$TGT"
    prepare.out_dir="$PREPARED")
# Tokenizer and binarized corpus, shared by both implementations and outside the timed run.
PREPARE=("$PY" -m seq2seq.prepare "$CONFIG" "${DATA_SETTINGS[@]}" "${EXTRA[@]}")
echo "+ $(shell_words "${PREPARE[@]}")"
"${PREPARE[@]}"
START=$SECONDS

if [[ "$IMPL" == hf ]]; then
    PEER=("$PY" "$HERE/bench_quality_hf.py" --config "$CONFIG" --data "$DATA" --src "$SRC"
        --tgt "$TGT" --minutes "$MAX_MINUTES" --average "$AVERAGE" --test-lines "$TEST_LINES"
        --valid-lines "$VALID_LINES" --lenpen-grid "${GRID[@]}" --out "$OUT" "${JSON_ARGS[@]}"
        prepare.out_dir="$PREPARED" "${EXTRA[@]}")
    echo "+ $(shell_words "${PEER[@]}")"
    exec "${PEER[@]}"
fi

# Ours: the recipe, each stage's python timed and measured by the wrapper below.
cat > "$OUT/bench/measure.py" <<'EOF'
"""python measure.py LOG ARGS...: run python ARGS, append its wall time and peak RSS to LOG."""
import json, resource, subprocess, sys, time

log, command = sys.argv[1], sys.argv[2:]
start = time.monotonic()
child = subprocess.Popen([sys.executable, *command])
while True:
    try:
        code = child.wait()
        break
    except KeyboardInterrupt:  # the child got the signal too; let it stop (and save) in peace
        pass
if command[:1] == ["-m"]:
    stage = command[1].rsplit(".", 1)[-1]
else:
    stage = command[0].rsplit("/", 1)[-1].removesuffix(".py")
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
record = {"stage": stage, "seconds": round(time.monotonic() - start, 1),
          "max_rss_mib": round(peak, 1), "exit": code}
with open(log, "a") as handle:
    handle.write(json.dumps(record) + "\n")
sys.exit(code)
EOF
cat > "$OUT/bench/python" <<EOF
#!/usr/bin/env bash
exec $(printf '%q' "$PY") $(printf '%q' "$OUT/bench/measure.py") \
    $(printf '%q' "$OUT/bench/stages.jsonl") "\$@"
EOF
chmod +x "$OUT/bench/python"
PYTHON="$OUT/bench/python" OUT="$OUT" SRC="$SRC" TGT="$TGT" DATA="$DATA" CONFIG="$CONFIG" \
    MAX_MINUTES="$MAX_MINUTES" AVERAGE="$AVERAGE" TEST_LINES="$TEST_LINES" STAGE="" \
    LENPEN_GRID="$LENPEN_GRID" VALID_LINES="$VALID_LINES" \
    OVERRIDES="prepare.out_dir=$PREPARED ${OVERRIDES:-}" bash "$ROOT/recipes/multi30k.sh"
echo "{\"stage\": \"total\", \"seconds\": $((SECONDS - START))}" >> "$OUT/bench/stages.jsonl"
"$PY" "$HERE/bench_quality_hf.py" --report "$OUT" "${JSON_ARGS[@]}"
