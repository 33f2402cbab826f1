# Stage 2 (RL) for train_ppo_mq.sh, train_ppo_sq.sh and train_grpo_mq.sh (sourced after RECIPE and MODE).
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

: "${SFT_MODEL:=$CKPT_ROOT/ragr1-sft-$MODE/best/huggingface}"
: "${RL_DATA:=$DATA_DIR/ragr1_$MODE}"
: "${CKPT_DIR:=$CKPT_ROOT/${RECIPE//_/-}}"
ragr1_need_file SFT_MODEL "$SFT_MODEL"
ragr1_need_file RL_DATA "$RL_DATA/train.parquet"
ragr1_only_config "$@" || ragr1_check_retriever

ragr1_only_config "$@" || { mkdir -p "$CKPT_DIR" && ragr1_record_prompt "$RL_DATA" "$CKPT_DIR"; }
models=(actor_rollout_ref.model.path="$SFT_MODEL")
[[ "$RECIPE" == ragr1_grpo ]] || models+=(critic.model.path="$SFT_MODEL")  # GRPO trains no critic
# The URL goes on the command line; the token stays in the environment (verl logs the whole config).
ragr1_run python -m verl.trainer.main_ppo +recipe="$RECIPE" \
    "${models[@]}" \
    data.train_files="$RL_DATA/train.parquet" data.val_files="$RL_DATA/test.parquet" \
    ragr1.retriever.url="$RETRIEVER_URL" \
    trainer.default_local_dir="$CKPT_DIR" trainer.experiment_name="${RECIPE//_/-}" \
    trainer.nnodes="$NNODES" trainer.n_gpus_per_node="$GPUS_PER_NODE" "$@"
