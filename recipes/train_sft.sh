#!/usr/bin/env bash
# Stage 1 of RAG-R1 on a GPU node: full-parameter SFT on the teacher's trajectories, then the checkpoint
# with the lowest validation loss becomes $CKPT_DIR/best (stage 2 starts from $CKPT_DIR/best/huggingface).
#
#   MODEL=Qwen/Qwen2.5-7B-Instruct MODE=mq bash recipes/train_sft.sh [hydra overrides ...]
#
# Settings (environment): MODEL (Qwen/Qwen2.5-7B-Instruct), MODE (mq|sq: the data folder), SFT_DATA
# ($DATA_DIR/sft_$MODE, holding ragr1-data sft's train/test.parquet), CKPT_DIR ($CKPT_ROOT/ragr1-sft-$MODE),
# NNODES (1), GPUS_PER_NODE (8), NODE_RANK (0) and MASTER_ADDR/MASTER_PORT for several nodes, DRY_RUN.
# Extra arguments go to verl's sft_trainer after the recipe, so they win; `--cfg job` prints the config.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

: "${MODEL:=Qwen/Qwen2.5-7B-Instruct}"
: "${MODE:=mq}"
: "${SFT_DATA:=$DATA_DIR/sft_$MODE}"
: "${CKPT_DIR:=$CKPT_ROOT/ragr1-sft-$MODE}"
ragr1_need_file SFT_DATA "$SFT_DATA/train.parquet"

if (( NNODES > 1 )); then
    rendezvous=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?NODE_RANK is needed with NNODES>1}"
                --master_addr="${MASTER_ADDR:?}" --master_port="${MASTER_PORT:-29500}")
else
    rendezvous=(--standalone --nnodes=1)
fi
[[ "$DRY_RUN" == 1 ]] || mkdir -p "$CKPT_DIR"
ragr1_record_prompt "$SFT_DATA" "$CKPT_DIR"
# One validation log per (re)start: verl's file logger truncates its file when it opens it.
export VERL_FILE_LOGGER_PATH="${VERL_FILE_LOGGER_PATH:-$CKPT_DIR/val-$(date +%s).jsonl}"
ragr1_run torchrun "${rendezvous[@]}" --nproc_per_node="$GPUS_PER_NODE" -m verl.trainer.sft_trainer \
    +recipe=ragr1_sft \
    model.path="$MODEL" \
    data.train_files="$SFT_DATA/train.parquet" data.val_files="$SFT_DATA/test.parquet" \
    trainer.default_local_dir="$CKPT_DIR" trainer.experiment_name="ragr1-sft-$MODE" \
    trainer.nnodes="$NNODES" trainer.n_gpus_per_node="$GPUS_PER_NODE" "$@"
if ragr1_only_config "$@" || [[ "${NODE_RANK:-0}" != 0 ]]; then
    exit 0
fi
ragr1_run python -m ragr1_verl.sft.checkpoints "$CKPT_DIR"
ragr1_say "stage 2 starts from $CKPT_DIR/best/huggingface"
