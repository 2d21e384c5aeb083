#!/usr/bin/env bash
# The MegaContext pipeline: a MegaContext base model (base model + GistNet + LensNet trained end to
# end) and its vanilla twin on the same tokens in the same order -> base eval -> mc_eval (gap closed
# vs truncation, gist substitution DeltaNLL, LensNet audit, NLL vs history plot, gist-first vs
# token-first; --task ck: facts read from a Core-Knowledge memory) -> chat SFT of the MegaContext model
# -> a chat answer, plain, through the MegaContext runtime with gist-first decoding, and with a
# Core-Knowledge memory of this repository's own code attached -> chat eval -> report.md.
#
#   bash megacontext_speedrun.sh           # GPU node: d12 (configs/d12_mc.toml + its twin configs/d12.toml)
#   DEPTH=20 NPROC=8 bash megacontext_speedrun.sh
#   bash megacontext_speedrun.sh           # no GPU: the tiny CPU profile, offline (the README main job, the recall testbed included: ~18 min on 2 Zen 4 cores, ~20 min on 2 AVX2-only Zen 3 ones, ~36-39 min on 2 Zen 1 ones, measured before the testbed took both cores at its end; 19 min on 2 Intel Xeon cores with AVX2 emulated)
#   TWIN=1 bash megacontext_speedrun.sh    # CPU: also train the vanilla twin (configs/cpu_tiny.toml)
# Everything goes to $NANOCHAT_BASE_DIR (default ~/.cache/nanochat); curves: base_checkpoints/<tag>/train_log.jsonl
# (tokens_seen, flops_seen, wall_s in every line, so the twins overlay by tokens, FLOPs or time).
# A re-run replaces the previous run's checkpoints under the same tags (--overwrite; without it a trainer refuses).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
export WANDB_MODE="${WANDB_MODE:-disabled}"
RUN="${WANDB_RUN:-dummy}"
# The venv is installed without .pyc files (--no-compile below): each module's first import writes its own and
# every later stage reads it. Under PYTHONDONTWRITEBYTECODE=1 (set in many container images) nothing would be
# written and each of the job's ~17 Python processes would compile torch's sources again (import torch: 5.0 s
# instead of 2.2 s on a 2 GHz Zen 1), so the job lets them write (into .venv/ and the gitignored __pycache__/).
unset PYTHONDONTWRITEBYTECODE

# stage NAME CMD...: run CMD and remember its wall time (timed NAME SECONDS); the table is printed at the end
STAGES=()
timed() {
    STAGES+=("$(printf '%-26s %6ds' "$1" "$2")")
}
stage() {
    local name=$1 t0=$SECONDS
    shift
    "$@"
    timed "$name" $((SECONDS - t0))
}

venv_install() {
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    # installed again only when pyproject.toml differs from the one installed last (by this job or runtests.sh):
    # pip's isolated build fetches setuptools each time, so an offline re-run would stop here. --no-compile: no
    # .pyc pass over all of torch (~25 s), imports compile what they use
    if ! cmp -s pyproject.toml .venv/nanochat-pyproject.toml; then
        .venv/bin/python -m pip install -q --no-compile -e .
        cp pyproject.toml .venv/nanochat-pyproject.toml
    fi
}
stage venv venv_install
PY=.venv/bin/python

# the GPUs this job may use: torch's count honours CUDA_VISIBLE_DEVICES (nvidia-smi -L lists every card)
GPUS=0
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
    [ "$GPUS" -gt 0 ] || echo "nvidia-smi lists GPUs but torch sees none (a CPU build of torch, or CUDA_VISIBLE_DEVICES): the CPU profile follows" >&2
fi
if [ "$GPUS" -gt 0 ]; then
    export OMP_NUM_THREADS=1
    DEPTH="${DEPTH:-12}"
    NPROC="${NPROC:-$GPUS}"
    SHARDS="${SHARDS:-240}"
    TRAIN="torchrun --standalone --nproc_per_node=$NPROC"
    stage report $PY -m nanochat.report reset
    stage data $PY -m nanochat.dataset -n 8
    $PY -m nanochat.dataset -n "$SHARDS" &
    DOWNLOAD_PID=$!
    trap 'kill "$DOWNLOAD_PID" 2>/dev/null || true' EXIT  # a failed stage stops the download too
    stage tokenizer $PY -m scripts.tok_train --overwrite --max-chars 2000000000 --vocab-size 32768
    stage tok_eval $PY -m scripts.tok_eval
    wait $DOWNLOAD_PID
    trap - EXIT
    stage base_train_mc $TRAIN scripts/base_train.py --config "configs/d${DEPTH}_mc.toml" --model-tag "d${DEPTH}_mc" --overwrite --run "${RUN}_mc"
    stage base_train $TRAIN scripts/base_train.py --config "configs/d${DEPTH}.toml" --model-tag "d${DEPTH}" --overwrite --run "$RUN"
    stage base_eval_mc $TRAIN scripts/base_eval.py --model-tag "d${DEPTH}_mc"
    stage base_eval $TRAIN scripts/base_eval.py --model-tag "d${DEPTH}"
    stage mc_eval $PY -m scripts.mc_eval --model-tag "d${DEPTH}_mc"
    stage mc_eval_ck $PY -m scripts.mc_eval --model-tag "d${DEPTH}_mc" --task ck --num-docs 48
    stage chat_sft $TRAIN scripts/chat_sft.py --model-tag "d${DEPTH}_mc" --overwrite --mixture full --run "$RUN"  # upstream's recipe: one epoch
    stage chat_eval $TRAIN scripts/chat_eval.py -i sft --model-tag "d${DEPTH}_mc"
else
    export NANOCHAT_DATASET=pystdlib  # the embedded offline corpus
    TAG=cpu_d3_mc
    stage report $PY -m nanochat.report reset
    stage data $PY -m nanochat.dataset --offline
    stage tokenizer $PY -m scripts.tok_train --overwrite --vocab-size 4096 --max-chars 50000000
    stage tok_eval $PY -m scripts.tok_eval --no-compare
    stage base_train_mc $PY -m scripts.base_train --config configs/cpu_tiny_mc.toml --model-tag "$TAG" --overwrite --run "$RUN"
    if [ "${TWIN:-0}" = 1 ]; then
        stage base_train_twin $PY -m scripts.base_train --config configs/cpu_tiny.toml --model-tag cpu_d3 --overwrite --run "$RUN"
    fi
    # The recall testbed (configs/cpu_recall_mc.toml: a d2 MegaContext model on dense recall rows) needs only the
    # data and the tokenizer: it trains on half the cores while the main model's evaluation and chat stages run on
    # the other half (neither job scales well to 2 threads); when those are done it trains on every core (SIGUSR1
    # to its base_train). Its log goes to $RECALL_LOG and is printed when both are done; its pass-key evaluation
    # then runs on all the cores.
    BASE="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
    RECALL_LOG="$BASE/recall_testbed.log"
    RECALL_JSON="$BASE/mc_eval/cpu_recall_mc_passkey.json"  # + its heat map, .png
    CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # the cores this job may use (taskset, a container's cpuset)
    HALF=$(( CORES / 2 > 0 ? CORES / 2 : 1 ))
    # its base_train itself is the background job, so a failed stage (the EXIT trap) or a kill of the whole job
    # stops it too; its stage time runs to its log's last write ("beside": it overlaps the others)
    RECALL_T0=$(date +%s)
    OMP_NUM_THREADS=$HALF $PY -m scripts.base_train --config configs/cpu_recall_mc.toml --model-tag cpu_recall_mc --overwrite \
        --run "$RUN" > "$RECALL_LOG" 2>&1 < /dev/null &
    RECALL_PID=$!
    trap 'kill "$RECALL_PID" 2>/dev/null || true' EXIT
    echo "recall testbed training beside the next stages on $HALF thread(s): tail -f $RECALL_LOG"
    export OMP_NUM_THREADS=$HALF
    stage base_eval $PY -m scripts.base_eval --eval bpb,sample --model-tag "$TAG" --split-tokens 131072 --device-batch-size 4
    stage mc_eval $PY -m scripts.mc_eval --model-tag "$TAG" --num-docs 12
    stage mc_eval_ck $PY -m scripts.mc_eval --model-tag "$TAG" --task ck --num-docs 24
    # upstream's SFT recipe: one epoch of the offline mixture (71 steps of 8 x 1024 tokens) at the base run's batch and rates;
    # on this base model Spelling 46.7% / Arithmetic 100% / the answer 437 in 223 s on 2 threads, where 400 steps of a
    # short CPU recipe (2 rows a step, fresh optimizer) took 652 s on 1 thread for 36.7% / 100% / 437
    stage chat_sft $PY -m scripts.chat_sft --model-tag "$TAG" --overwrite
    stage chat $PY -m scripts.chat_cli --model-tag "$TAG" -t 0 -p "Maya buys 23 boxes of apples. Each of the boxes holds 19 apples. How many apples did Maya buy?"
    stage chat_gist_first $PY -m scripts.chat_cli --model-tag "$TAG" -t 0 --gist-first -p "Maya buys 23 boxes of apples. Each of the boxes holds 19 apples. How many apples did Maya buy?"
    CK="$BASE/ck/nanochat_src"
    rm -rf "$CK"  # rebuilt from the code as it is now
    stage mc_build_ck $PY -m scripts.mc_build_ck --input nanochat --ext py --out "$CK" --model-tag "$TAG"
    stage chat_ck $PY -m scripts.chat_cli --model-tag "$TAG" -t 0 --ck "$CK" -p "What does the FocusAllocator do with LensNet's scores?"
    stage chat_eval $PY -m scripts.chat_eval -i sft --model-tag "$TAG" -a Arithmetic,Spelling -x 30 -m 96
    unset OMP_NUM_THREADS
    kill -USR1 "$RECALL_PID" 2>/dev/null || true  # the testbed, if still training, takes every core from its next step
    wait "$RECALL_PID" || { cat "$RECALL_LOG"; echo "the recall testbed failed (log above: $RECALL_LOG)"; exit 1; }
    trap - EXIT
    cat "$RECALL_LOG"
    timed "base_train_recall (beside)" $(( $(stat -c %Y "$RECALL_LOG") - RECALL_T0 ))
    stage mc_eval_recall $PY -m scripts.mc_eval --model-tag cpu_recall_mc --task passkey --mults 8,16 --num-docs 16 --out "$RECALL_JSON"
fi
stage report_md $PY -m nanochat.report generate
echo
echo "wall time per stage (the whole job: $((SECONDS))s, venv install included):"
printf '  %s\n' "${STAGES[@]}"
if [ -n "${RECALL_JSON:-}" ]; then
    echo
    echo "recall heat map: ${RECALL_JSON%.json}.png"
    $PY -c "import json, sys; [print(v) for v in json.load(open(sys.argv[1]))['verdicts']]" "$RECALL_JSON"
fi
