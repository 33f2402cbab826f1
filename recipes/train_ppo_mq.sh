#!/usr/bin/env bash
# Stage 2 of RAG-R1 on GPU nodes, +recipe=ragr1: PPO with a critic in mq mode: the paper's main run.
#
#   bash recipes/train_ppo_mq.sh [hydra overrides ...]
#
# Start the retriever first (the script checks its /health). Settings (environment): SFT_MODEL
# ($CKPT_ROOT/ragr1-sft-mq/best/huggingface, from train_sft.sh with MODE=mq), RL_DATA ($DATA_DIR/ragr1_mq,
# holding ragr1-data rl's train/test.parquet), RETRIEVER_URL ($RAGR1_RETRIEVER_URL, else
# http://127.0.0.1:8000/retrieve; the token is read from RAGR1_RETRIEVER_TOKEN by the workers), CKPT_DIR
# ($CKPT_ROOT/ragr1), NNODES (1; start Ray on every node first), GPUS_PER_NODE (8), DRY_RUN,
# SKIP_RETRIEVER_CHECK. Extra arguments go to verl's main_ppo after the recipe, so they win; `--cfg job`
# prints the config without starting anything.
RECIPE=ragr1
MODE=mq
source "$(dirname "${BASH_SOURCE[0]}")/_stage2.sh"
