# Stage runner shared by the recipes (sourced, not run). Wiring only: every stage is one command.
# It also sets PY (the interpreter) and defines the defaults shared by recipes: default_data (DATA)
# and torchrun_processes (NGPU).
#
#   run_stage N NAME [--stdout FILE] COMMAND [ARG ...]
#
# echoes the command, runs it, and records "$OUT/.stages/N.done". A stage already done is skipped,
# so running a recipe again continues where it stopped. STAGE=n starts at stage n and runs it and
# every later stage again, done or not. With --stdout, the command's standard output is shown and
# written to FILE (via FILE.tmp, renamed only when the command succeeds).
#
# Sourced without arguments, it sees the recipe's own: "-h" or "--help" prints the recipe's header
# (its usage comment) and exits 0 before any work starts.

# The comment block at the top of a script, without the "#!" line and the leading "# ".
recipe_usage() {
    awk 'NR == 1 && /^#!/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        recipe_usage "$0"
        exit 0
    fi
done

STAGE="${STAGE:-}"

# OpenMP threads that spin while waiting collapse when the cores are shared with other processes
# (measured here: a training update 6x slower with two busy neighbours); passive waiting costs
# little on an idle machine.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# Large tensors on transparent huge pages (the same defaults as seq2seq/__main__.py's).
export THP_MEM_ALLOC_ENABLE="${THP_MEM_ALLOC_ENABLE:-1}"

run_stage() {
    local n="$1" name="$2" stdout=""
    shift 2
    if [[ "${1:-}" == "--stdout" ]]; then
        stdout="$2"
        shift 2
    fi
    if [[ -n "$STAGE" ]] && ((n < STAGE)); then
        echo "=== stage $n ($name): skipped (STAGE=$STAGE)"
        return 0
    fi
    if [[ -z "$STAGE" && -e "$OUT/.stages/$n.done" ]]; then
        echo "=== stage $n ($name): done already ($OUT/.stages/$n.done; STAGE=$n redoes it)"
        return 0
    fi
    echo "=== stage $n ($name)"
    if [[ -n "$stdout" ]]; then
        echo "+ $(shell_words "$@") > $(shell_words "$stdout")"
        "$@" | tee "$stdout.tmp"
        mv "$stdout.tmp" "$stdout"
    else
        echo "+ $(shell_words "$@")"
        "$@"
    fi
    mkdir -p "$OUT/.stages"
    touch "$OUT/.stages/$n.done"
}

# The arguments as one line that a shell reads back the same (quoted only where needed).
shell_words() {
    local word words=()
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then
            words+=("$word")
        elif [[ "$word" != *"'"* ]]; then
            words+=("'$word'")
        else
            words+=("$(printf '%q' "$word")")
        fi
    done
    echo "${words[*]}"
}

# The interpreter the recipes call: $PYTHON, else the repository's .venv, else python3.
default_python() {
    local root="$1"
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
    elif [[ -x "$root/.venv/bin/python" ]]; then
        echo "$root/.venv/bin/python"
    else
        echo python3
    fi
}

# What every recipe's stages run: "$PY" -m seq2seq.<module> ...
PY="$(default_python "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)")"
# tcmalloc where installed, as the seq2seq command preloads it (seq2seq/__main__.py says why).
if [[ -z "${LD_PRELOAD:-}" && "${SEQ2SEQ_ALLOCATOR:-tcmalloc}" == tcmalloc ]]; then
    TCMALLOC="$("$PY" -c 'import ctypes.util; print(ctypes.util.find_library("tcmalloc_minimal") or "")')"
    if [[ -n "$TCMALLOC" ]]; then
        export LD_PRELOAD="$TCMALLOC"
    fi
fi

# The corpus a recipe reads: $DATA if set, else $SEQ2SEQ_DATA/NAME when that folder exists, else
# "hub" (the Hugging Face hub).
default_data() {
    local name="$1"
    if [[ -n "${DATA:-}" ]]; then
        echo "$DATA"
    elif [[ -n "${SEQ2SEQ_DATA:-}" && -d "$SEQ2SEQ_DATA/$name" ]]; then
        echo "$SEQ2SEQ_DATA/$name"
    else
        echo hub
    fi
}

# How many processes torchrun starts: $NGPU if set, else every GPU that python's torch sees; with
# none, one CPU process (said on stderr under the recipe's name).
torchrun_processes() {
    local recipe="$1" python="$2" count="${NGPU:-}"
    if [[ -z "$count" ]]; then
        count="$("$python" -c 'import torch; print(torch.cuda.device_count())')" || return
    fi
    if ((count < 1)); then
        echo "$recipe: no GPU visible; running one CPU process (set NGPU to override)" >&2
        count=1
    fi
    echo "$count"
}
