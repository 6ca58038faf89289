#!/usr/bin/env bash
# GPU benchmarks: bfloat16, ours (JAX) vs PyTorch on the same card, Qwen2.5-0.5B and 1.5B layer shapes.
# Per preset (benchmarks/gpu_bench.py): PAC-LoRA layer fwd+bwd, training step (and plain LoRA, MFU),
# greedy KV-cache decoding at batch 1 and 8; every comparison checked for agreement before timing.
# Needs jax[cuda] and a CUDA build of torch. One JSON line per preset; < 8 min on one H100
# (each preset is cut off by its own timeout, so one that hangs cannot take the other's time).
#   bash benchmarks/gpu.sh [OUT_DIR]            # real run; with OUT_DIR: OUT_DIR/gpu_bench.jsonl + one log per preset
#   bash benchmarks/gpu.sh --smoke [OUT_DIR]    # every part at tiny shapes on the CPU: checks that the script works
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [[ "${1:-}" == "--smoke" ]]; then
  smoke=1
  shift
fi
out_dir="${1:-}"
out_args=()
if [[ -n "$out_dir" ]]; then
  mkdir -p "$out_dir"
  out_dir="$(cd "$out_dir" && pwd)"
  out_args=(--out "$out_dir/gpu_bench.jsonl")
fi

# run NAME TIMEOUT ARGS...: one gpu_bench.py call, its output also in OUT_DIR/NAME.log when given.
run() {
  local name=$1 limit=$2
  shift 2
  local log=/dev/null
  [[ -n "$out_dir" ]] && log="$out_dir/$name.log"
  timeout "$limit" python benchmarks/gpu_bench.py "$@" "${out_args[@]}" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  if (( rc != 0 )); then
    echo "gpu.sh: $name failed (exit $rc$( (( rc == 124 )) && echo ", timed out after ${limit} s"))" >&2
  fi
  return "$rc"
}

if (( smoke )); then
  run smoke 170 --smoke
  exit $?
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
# Shapes: 4 layers, batch 8 x 1024 (256 response tokens) for the layer and the step, prompt 128 + 64
# new tokens for decoding. Most of each preset's time is JAX compilation (five programs) and
# building the HF model on the host, not the timed repeats.
status=0
run qwen2.5-0.5b 210 --preset qwen2.5-0.5b --layers 4 --batch 8 --seq 1024 --resp 256 --repeats 10 || status=1
run qwen2.5-1.5b 250 --preset qwen2.5-1.5b --layers 4 --batch 8 --seq 1024 --resp 256 --repeats 10 || status=1
exit $status
