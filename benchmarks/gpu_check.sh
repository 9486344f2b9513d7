#!/usr/bin/env bash
# GPU readiness in one command; prints one JSON summary on stdout (progress on stderr).
#
#   bash benchmarks/gpu_check.sh           # on a machine with a CUDA GPU, < 8 minutes
#   bash benchmarks/gpu_check.sh --cpu     # the same steps at toy sizes on the CPU (CI runs this)
#
# Steps: (1) tests/test_gpu.py on the device (model, cached decoding, greedy and beam search
# against the CPU, training in every precision the device has); (2) benchmarks/gpu_check.py:
# transformer_base training at ~25k tokens per update in bf16 and in fp16 with loss scaling,
# tokens/s and MFU against the measured matmul peak, torch.compile off and on, beam-4 decoding of
# newstest-sized input (3,003 sentences); (3) `torchrun --nproc_per_node 1` training (NCCL on
# CUDA, gloo on the CPU). PYTHON picks the interpreter (default .venv/bin/python, else python3).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}"
MODE=cuda
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; elif [[ -n "${1:-}" ]]; then
    echo "usage: bash benchmarks/gpu_check.sh [--cpu]" >&2
    exit 2
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" THP_MEM_ALLOC_ENABLE="${THP_MEM_ALLOC_ENABLE:-1}"

echo "gpu_check: [1/3] tests/test_gpu.py on $MODE" >&2
tests_rc=0
SEQ2SEQ_TEST_DEVICE="$MODE" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    > "$WORK/tests.log" 2>&1 || tests_rc=$?
tail -n 3 "$WORK/tests.log" >&2

echo "gpu_check: [2/3] training and decoding figures" >&2
bench_args=()
[[ "$MODE" == cpu ]] && bench_args=(--cpu)
bench_rc=0
"$PYTHON" benchmarks/gpu_check.py "${bench_args[@]}" > "$WORK/bench.json" || bench_rc=$?

echo "gpu_check: [3/3] torchrun --nproc_per_node 1" >&2
mkdir -p "$WORK/corpus"
"$PYTHON" recipes/tools/make_toy_corpus.py "$WORK/corpus" --train 2000 --valid 100 --test 100 >&2
torchrun_rc=0
"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -m seq2seq.train \
    recipes/configs/multi30k_quick.yaml "data.path=$WORK/corpus" "train.out_dir=$WORK/run" \
    "train.device=$MODE" data.vocab_size=500 train.max_steps=20 train.max_minutes=0 \
    train.eval_every=20 train.save_every=20 train.log_every=10 \
    > "$WORK/torchrun.log" 2>&1 || torchrun_rc=$?
tail -n 2 "$WORK/torchrun.log" >&2

"$PYTHON" - "$WORK" "$tests_rc" "$bench_rc" "$torchrun_rc" <<'PY'
import json, re, sys
from pathlib import Path
work, tests_rc, bench_rc, torchrun_rc = Path(sys.argv[1]), *map(int, sys.argv[2:])
tests = (work / "tests.log").read_text().strip().splitlines()[-1]
try:
    bench = json.loads((work / "bench.json").read_text())
except ValueError:
    bench = {"error": "benchmarks/gpu_check.py printed no JSON"}
log = (work / "torchrun.log").read_text()
precision = re.search(r"precision: auto -> .*", log)
summary = {
    "ok": tests_rc == 0 and bench_rc == 0 and torchrun_rc == 0,
    "tests": {"ok": tests_rc == 0, "summary": tests},
    "torchrun": {"ok": torchrun_rc == 0, "precision": precision.group(0) if precision else None,
                 "last_line": log.strip().splitlines()[-1] if log.strip() else ""},
    **bench,
}
print(json.dumps(summary, indent=2))
sys.exit(0 if summary["ok"] else 1)
PY
