#!/usr/bin/env bash
# Launch one Long-VITA stage on a GPU cluster (Transformer Engine specs when installed).
#
#   STAGE=1 TOKENIZER=/models/Qwen2.5-14B-Instruct LOAD=/ckpt/hf2mcore SAVE=/ckpt/stage1 \
#   NNODES=8 NODE_RANK=$RANK MASTER_ADDR=node0 bash examples/gpu/train.sh [extra Megatron flags]
#
# Stage N+1 starts from stage N's checkpoint: LOAD=/ckpt/stage1 (the YAML sets --finetune).
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${STAGE:?set STAGE=1..4}" "${TOKENIZER:?set TOKENIZER to a HF tokenizer directory}" "${SAVE:?set SAVE}"
CONFIG="${CONFIG:-examples/configs/stage${STAGE}_${MODEL_SIZE:-14b}.yaml}"
export CUDA_DEVICE_MAX_CONNECTIONS=1  # required by megatron's TP/SP communication overlap
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${GPUS_PER_NODE:-8}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m megatron_longvita.train --config "$CONFIG" --tokenizer-model "$TOKENIZER" --save "$SAVE" \
    ${LOAD:+--load "$LOAD"} ${TENSORBOARD_DIR:+--tensorboard-dir "$TENSORBOARD_DIR"} "$@"
