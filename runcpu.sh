#!/usr/bin/env bash
# The main job on a laptop CPU, offline: embedded corpus -> tokenizer -> tiny base model ->
# SFT -> a chat answer -> chat eval on the offline tasks -> report.md. ~16 minutes on 2 cores.
# Everything goes to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
export NANOCHAT_DATASET=pystdlib
export WANDB_MODE="${WANDB_MODE:-disabled}"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -e .
PY=.venv/bin/python

$PY -m nanochat.report reset
$PY -m nanochat.dataset --offline
$PY -m scripts.tok_train --overwrite --vocab-size 4096 --max-chars 50000000
$PY -m scripts.tok_eval --no-compare
$PY -m scripts.base_train --config configs/cpu_tiny.toml --model-tag cpu_d3 --overwrite
$PY -m scripts.base_eval --eval bpb,sample --model-tag cpu_d3 --split-tokens 131072 --device-batch-size 4
$PY -m scripts.chat_sft --model-tag cpu_d3 --overwrite  # upstream's recipe: one epoch of the offline mixture
$PY -m scripts.chat_cli --model-tag cpu_d3 -t 0 -p "Maya buys 23 boxes of apples. Each of the boxes holds 19 apples. How many apples did Maya buy?"
$PY -m scripts.chat_eval -i sft --model-tag cpu_d3 -a Arithmetic,Spelling -x 30 -m 96
$PY -m nanochat.report generate
