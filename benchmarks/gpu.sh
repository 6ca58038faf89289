#!/usr/bin/env bash
# Superseded by benchmarks/device_check.sh, which runs the same benchmark sections (gpu_bench.py)
# after a bf16-vs-float32 agreement check, each section under its own `timeout -k`, writing JSON
# lines as it goes. Kept as a wrapper for old command lines:
#   bash benchmarks/gpu.sh [--smoke] [OUT_DIR]     (OUT_DIR defaults to ./gpu_out)
set -uo pipefail
args=()
out=""
for a in "$@"; do
  if [[ "$a" == --* ]]; then args+=("$a"); else out="$a"; fi
done
exec bash "$(dirname "$0")/device_check.sh" "${out:-gpu_out}" "${args[@]}"
