#!/usr/bin/env bash
# Serve a checkpoint over HTTP (OpenAI chat API + the reference's PUT /api) on one GPU node.
#
#   LOAD=/ckpt/stage4/iter_0001000 TOKENIZER=/models/Qwen2.5-14B-Instruct TP=4 CP=2 \
#   bash examples/gpu/serve.sh [--host 0.0.0.0 --api-key KEY --allowed-media-root /data ...]
#
# TP x CP GPUs; binds 127.0.0.1:${PORT:-8000} unless --host is given.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${LOAD:?set LOAD to a torch_dist checkpoint}" "${TOKENIZER:?set TOKENIZER to a HF tokenizer directory}"
TP="${TP:-1}" CP="${CP:-1}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec torchrun --nproc_per_node $((TP * CP)) --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29500}" \
    -m megatron_longvita.serve --load "$LOAD" --tokenizer "$TOKENIZER" --tp "$TP" --cp "$CP" \
    --port "${PORT:-8000}" --served-model-name "${SERVED_MODEL_NAME:-long-vita}" "$@"
