#!/usr/bin/env bash
# The GPU-node pipeline (vanilla): data -> tokenizer -> base pretraining -> base eval ->
# chat SFT -> chat eval -> report.md.
# Meant for one node of 8 GPUs (set NPROC for fewer); ~hours, not minutes. For the offline
# CPU demo use runcpu.sh instead.
#   bash speedrun.sh                 # d20 on the public pretraining shards
#   DEPTH=12 NPROC=1 bash speedrun.sh
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
DEPTH="${DEPTH:-20}"
NPROC="${NPROC:-$(nvidia-smi -L | wc -l)}"
RUN="${WANDB_RUN:-dummy}"
SHARDS="${SHARDS:-240}"

[ -x .venv/bin/python ] || python3 -m venv .venv
source .venv/bin/activate
pip install -q -e .

python -m nanochat.report reset

# data: 8 shards for the tokenizer first, the rest in the background while it trains
python -m nanochat.dataset -n 8
python -m nanochat.dataset -n "$SHARDS" &
DOWNLOAD_PID=$!
python -m scripts.tok_train --overwrite --max-chars 2000000000 --vocab-size 32768
python -m scripts.tok_eval
wait $DOWNLOAD_PID

torchrun --standalone --nproc_per_node="$NPROC" scripts/base_train.py --depth "$DEPTH" --overwrite --run "$RUN"
torchrun --standalone --nproc_per_node="$NPROC" scripts/base_eval.py --model-tag "d$DEPTH"

torchrun --standalone --nproc_per_node="$NPROC" scripts/chat_sft.py --model-tag "d$DEPTH" --overwrite --mixture full --run "$RUN"  # upstream's recipe: one epoch
torchrun --standalone --nproc_per_node="$NPROC" scripts/chat_eval.py -i sft --model-tag "d$DEPTH"
python -m nanochat.report generate
