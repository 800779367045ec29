#!/usr/bin/env bash
# Serve a checkpoint over HTTP on one Ascend NPU node (torch_npu + MindSpeed from Ascend's
# channels). Same variables as examples/gpu/serve.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${LOAD:?set LOAD to a torch_dist checkpoint}" "${TOKENIZER:?set TOKENIZER to a HF tokenizer directory}"
TP="${TP:-1}" CP="${CP:-1}"
if [ -f "${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit}/set_env.sh" ]; then
    source "${ASCEND_TOOLKIT_HOME:-/usr/local/Ascend/ascend-toolkit}/set_env.sh"
fi
export LONGVITA_PLATFORM=npu CUDA_DEVICE_MAX_CONNECTIONS=1
export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}" HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1200}"
exec torchrun --nproc_per_node $((TP * CP)) --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" \
    -m megatron_longvita.serve --load "$LOAD" --tokenizer "$TOKENIZER" --tp "$TP" --cp "$CP" \
    --port "${PORT:-8000}" --served-model-name "${SERVED_MODEL_NAME:-long-vita}" "$@"
