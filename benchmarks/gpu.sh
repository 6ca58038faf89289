#!/usr/bin/env bash
# GPU benchmarks: bfloat16, ours (JAX) vs PyTorch on the same card, Qwen2.5-0.5B and 1.5B layer shapes.
# Needs jax[cuda] and a CUDA build of torch. One JSON line per configuration; < 8 min on one H100.
#   bash benchmarks/gpu.sh            # real run on the GPU
#   bash benchmarks/gpu.sh --smoke    # tiny shapes on CPU: checks that the script works
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
python -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"
if [[ "${1:-}" == "--smoke" ]]; then
  python benchmarks/gpu_bench.py --smoke
  exit 0
fi
for preset in qwen2.5-0.5b qwen2.5-1.5b; do
  timeout 200 python benchmarks/gpu_bench.py --preset "$preset" --layers 4 --batch 8 --seq 1024 --resp 256 --repeats 10
done
