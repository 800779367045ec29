#!/usr/bin/env bash
# Launch one Long-VITA stage on an Ascend NPU cluster (torch_npu + MindSpeed from Ascend's
# channels; see README "Version matrix"). Same variables as examples/gpu/train.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${STAGE:?set STAGE=1..4}" "${TOKENIZER:?set TOKENIZER to a HF tokenizer directory}" "${SAVE:?set SAVE}"
CONFIG="${CONFIG:-examples/configs/stage${STAGE}_${MODEL_SIZE:-14b}.yaml}"
if [ -f "${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit}/set_env.sh" ]; then
    source "${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit}/set_env.sh"
fi
export LONGVITA_PLATFORM=npu CUDA_DEVICE_MAX_CONNECTIONS=1
export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}" HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1200}"
export PYTORCH_NPU_ALLOC_CONF="${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}"
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPUS_PER_NODE:-8}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m megatron_longvita.train --config "$CONFIG" --tokenizer-model "$TOKENIZER" --save "$SAVE" \
    ${LOAD:+--load "$LOAD"} ${TENSORBOARD_DIR:+--tensorboard-dir "$TENSORBOARD_DIR"} "$@"
