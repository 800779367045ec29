#!/usr/bin/env bash
# The embedded main job on a fresh CPU machine: create .venv, install, then train the tiny
# decoder for 30 steps under TP=2 x PP=2 (4 gloo ranks) and print its loss curve.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh
ensure_venv
export LONGVITA_PLATFORM="${LONGVITA_PLATFORM:-cpu}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "[quickstart] training the tiny decoder, TP=2 x PP=2 on 4 CPU ranks"
.venv/bin/torchrun --nproc_per_node 4 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29511}" \
    -m megatron_longvita.training.synthetic --tp 2 --pp 2 --steps 30
