#!/usr/bin/env bash
# The embedded main job on a fresh CPU machine, start to finish (~2-3 minutes on 2 cores):
#   1. create .venv and install;
#   2. generate a synthetic multimodal corpus (coloured shapes with captions and questions,
#      a few short videos) and a tokenizer trained on it;
#   3. stage 1 (projector only) then stage 2 (all trainable) of the tiny Long-VITA model on
#      2 gloo ranks with TP=2, printing the loss as it falls;
#   4. export the result as a Hugging Face model directory (the released Long-VITA layout);
#   5. ask the trained model about an image it never saw.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh
ensure_venv
export LONGVITA_PLATFORM="${LONGVITA_PLATFORM:-cpu}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"  # third-party deprecation notices drown the progress
RUN="${RUN:-runs/quickstart}"
PY=.venv/bin/python
launch() { .venv/bin/torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "${MASTER_PORT:-29511}" "$@"; }
rm -rf "$RUN" && mkdir -p "$RUN"

echo "[quickstart 1/5] synthetic corpus -> $RUN/data"
$PY tools/make_synthetic_dataset.py --out "$RUN/data" > "$RUN/corpus.json"
TOKENIZER="$RUN/data/tokenizer"
TEST_IMAGE=$($PY -c "import json; print(json.load(open('$RUN/corpus.json'))['test_images'][0][0])")
EXPECTED=$($PY -c "import json; print(json.load(open('$RUN/corpus.json'))['test_images'][0][1])")

echo "[quickstart 2/5] stage 1: projector only (TP=2)"
launch -m megatron_longvita.train --config examples/configs/tiny_stage1.yaml --train-iters 30 \
    --data-path "$RUN/data/mixture.yaml" --tokenizer-model "$TOKENIZER" --save "$RUN/stage1" --log-interval 10

echo "[quickstart 3/5] stage 2: everything trainable, from stage 1's weights (TP=2)"
launch -m megatron_longvita.train --config examples/configs/tiny_stage2.yaml \
    --data-path "$RUN/data/mixture.yaml" --tokenizer-model "$TOKENIZER" --load "$RUN/stage1" --save "$RUN/stage2" \
    --tensorboard-dir "$RUN/tensorboard"
FINAL="$RUN/stage2/iter_$(printf %07d "$(cat "$RUN/stage2/latest_checkpointed_iteration.txt")")"

echo "[quickstart 4/5] megatron -> Hugging Face (Long-VITA layout): $RUN/hf"
$PY tools/convert_checkpoint.py mcore2hf --load-dir "$FINAL" --save-dir "$RUN/hf" --format longvita

echo "[quickstart 5/5] asking about an unseen image (it shows: $EXPECTED): $TEST_IMAGE"
launch -m megatron_longvita.generate --load "$FINAL" --tp 2 --tokenizer "$TOKENIZER" --image "$TEST_IMAGE" \
    --prompt "What is in the image?" --max-new-tokens 12 --stream --output "$RUN/answer.json"
