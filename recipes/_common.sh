# Shared by the launch scripts (sourced, never run): settings from the environment, checks, and the command.
# Every setting has a default; the launch scripts' header lists them.

set -euo pipefail

: "${NNODES:=1}"                         # paper: one node
: "${GPUS_PER_NODE:=8}"                  # paper: 8 A100 80 GB
: "${DATA_DIR:=$PWD/data}"
: "${CKPT_ROOT:=$PWD/checkpoints}"
: "${RETRIEVER_URL:=${RAGR1_RETRIEVER_URL:-http://127.0.0.1:8000/retrieve}}"
: "${DRY_RUN:=0}"                        # 1: print the command instead of running it

ragr1_say() { echo "[ragr1] $*" >&2; }

ragr1_die() { ragr1_say "error: $*"; exit 2; }

ragr1_need_file() {  # a file a stage reads, named with the variable that sets it
    [[ "$DRY_RUN" == 1 || -e "$2" ]] || ragr1_die "$1=$2 does not exist"
}

ragr1_only_config() {  # true when verl is asked to print its config (--cfg, --info) rather than to train
    local arg
    for arg in "$@"; do [[ "$arg" == --cfg || "$arg" == --info ]] && return 0; done
    return 1
}

ragr1_check_retriever() {  # stage 2 needs the retriever before the first rollout, not after a model load
    [[ "$DRY_RUN" == 1 || "${SKIP_RETRIEVER_CHECK:-0}" == 1 ]] && return 0
    local health="${RETRIEVER_URL%/retrieve}/health"
    curl -sf --max-time 10 "$health" >/dev/null \
        || ragr1_die "no retriever answers at $health (start one: ragr1-retriever serve ...; SKIP_RETRIEVER_CHECK=1 skips this)"
}

ragr1_run() {
    ragr1_say "$*"
    [[ "$DRY_RUN" == 1 ]] || "$@"
}

ragr1_record_prompt() {  # the prompt the data was written with, beside the checkpoints (ragr1-eval checks it)
    local record="$1/ragr1_prompt.json"
    [[ "$DRY_RUN" == 1 ]] && return 0
    if [[ -f "$record" ]]; then
        cp "$record" "$2/"
    else
        ragr1_say "warning: no $record (data written by an older ragr1-data?): ragr1-eval cannot check the prompt"
    fi
}
