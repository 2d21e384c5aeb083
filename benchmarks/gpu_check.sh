#!/usr/bin/env bash
# The GPU node check: the figures only a GPU can give, in one run, each part one JSON line on stdout
# (the benchmark's own line plus "check", its name, and "wall_s"; a part that fails or passes its
# time limit prints {"check", "error"}, the others still run, and the exit status is 1). Progress goes
# to stderr. The interpreter: $PYTHON, else the job's .venv/bin/python, else python3.
#
#   bash benchmarks/gpu_check.sh            # one H100 / H200: about 8 minutes
#   bash benchmarks/gpu_check.sh --cpu      # the same parts at CPU sizes (a machine without a GPU)
#   bash benchmarks/gpu_check.sh --smoke    # the same parts at toy sizes, seconds each (tests/test_benchmarks.py)
#
# Parts:
#   vanilla      d12 / seq 2048 / SSSL windows: tokens/s and MFU (bf16, compiled; the S layers through
#                flex_attention with a block mask)
#   vanilla_mask the same with NANOCHAT_FLEX=0 (S layers through SDPA with an explicit mask), to see what
#                flex_attention buys
#   megacontext  configs/d12_mc.toml: the MegaContext step's tokens/s, its ratio to the vanilla twin
#                measured in the same process, peak memory of each (compiled LM and variant forward)
#   decode       decode ms/token of a runtime session at 1k- and 1M-token histories (ratio_1m_1k)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
command -v "$PY" >/dev/null || { echo "gpu_check: no Python interpreter '$PY' (set PYTHON)" >&2; exit 2; }
export WANDB_MODE=disabled
mode="${1:-gpu}"

case "$mode" in
  gpu|--gpu)
    VANILLA=(--depth 12 --max-seq-len 2048 --device-batch-size 32 --steps 20 --warmup 5)
    MC=(--config configs/d12_mc.toml --steps 5 --warmup 2)
    DECODE=(--config configs/d12_mc.toml --histories 1000,1000000 --decode 128)
    LIMITS=(110 110 170 110) ;;
  --cpu)
    VANILLA=(--depth 4 --max-seq-len 512 --device-batch-size 4 --vocab-size 4096 --steps 5 --warmup 1)
    MC=(--config configs/cpu_tiny_mc.toml --vocab-size 4096 --steps 3 --warmup 1)
    DECODE=(--config configs/cpu_tiny_mc.toml --vocab-size 4096 --histories 1000,1000000 --decode 128)
    LIMITS=(300 300 600 600) ;;
  --smoke)
    TINY=(--depth 1 --aspect-ratio 64 --head-dim 64 --vocab-size 256 --device-type cpu)
    MCFLAGS=(--megacontext --mc-w-max 128 --mc-max-level 1 --mc-horizon 32 --mc-recent-tokens 32 --mc-gist-layers 1
             --mc-lens-layers 1 --mc-lens-hidden 32)
    VANILLA=("${TINY[@]}" --max-seq-len 256 --window-pattern SL --device-batch-size 2 --steps 2 --warmup 1)
    MC=("${TINY[@]}" --max-seq-len 256 --device-batch-size 2 --steps 1 --warmup 1 "${MCFLAGS[@]}")
    DECODE=("${TINY[@]}" --max-seq-len 256 --histories 300,3000 --decode 32 --warmup 8 --w-max 128 --vanilla-max-gib 1 "${MCFLAGS[@]}")
    LIMITS=(120 120 120 120) ;;
  *)
    echo "usage: bash benchmarks/gpu_check.sh [--cpu | --smoke]" >&2
    exit 2 ;;
esac

part() {  # part NAME LIMIT_S ENV MODULE ARGS...: run one benchmark, print its last stdout line tagged
  local name="$1" limit="$2" env="$3" module="$4"
  shift 4
  echo "gpu_check: $name ..." >&2
  local out start rc
  out="$(mktemp)"
  start=$(date +%s.%N)
  env $env timeout "$limit" "$PY" -m "benchmarks.$module" "$@" > "$out"
  rc=$?
  "$PY" - "$name" "$rc" "$start" "$limit" "$out" <<'EOF'
import json, sys, time
name, rc, start, limit, path = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
lines = [l for l in open(path).read().splitlines() if l.strip()]
head = {"check": name, "wall_s": round(time.time() - start, 1)}
if rc == 0 and lines:
    print(json.dumps({**head, **json.loads(lines[-1])}))
else:
    why = f"passed its {limit} s limit" if rc in (124, 137) else f"exit status {rc}"
    print(json.dumps({**head, "error": why}))
    sys.exit(1)
EOF
  rc=$?
  rm -f "$out"
  return $rc
}

failed=0
part vanilla "${LIMITS[0]}" "NANOCHAT_FLEX=" train_throughput "${VANILLA[@]}" || failed=1
part vanilla_mask "${LIMITS[1]}" "NANOCHAT_FLEX=0" train_throughput "${VANILLA[@]}" || failed=1
part megacontext "${LIMITS[2]}" "NANOCHAT_FLEX=" mc_train_throughput "${MC[@]}" || failed=1
part decode "${LIMITS[3]}" "NANOCHAT_FLEX=" mc_inference "${DECODE[@]}" || failed=1
exit $failed
