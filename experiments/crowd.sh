#!/usr/bin/env bash
# The crowd benchmark (docs/experiments.md, EVAL.md): can the model forecast a NEW event's crowd
# better than the average mix? Datasets, frozen-feature caches, both plans, tables into EVAL.md.
# Every stage resumes: a built dataset is kept, a feature cache continues at its first missing
# chunk, a plan skips the cells already in its cells.jsonl.
#   bash experiments/crowd.sh [WORK_DIR]      # default /tmp/socialalign_crowd
# LABELLER (default: the one docs/labellers.md chooses) labels CED's responses; CED_EVENTS events are
# featurised (their cases capped at CED_CASES each); ZS_CASES cases per ZS-CSD target.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/socialalign_crowd}
SHARED=${SHARED:-$(cd .. && pwd)/shared}
LABELLER=${LABELLER:-ngram}
CED_EVENTS=${CED_EVENTS:-500}
CED_CASES=${CED_CASES:-3}
ZS_CASES=${ZS_CASES:-8}
export CROWD_FEATURES=$WORK/features
mkdir -p "$WORK"
tok=$WORK/tokenizer
[ -f "$tok/tokenizer.json" ] || python -c "from socialalign_jax.weights.resolve import resolve_weights as r; r('gguf:smollm2').tokenizer.save_pretrained('$tok')"

# ZS-CSD: 45 targets, human stance labels; the authors' prompt with the thread as the user's history.
[ -d "$WORK/data/zs_csd" ] || python launch/build_dataset.py --source zs_csd --input "$SHARED/data/zs_csd" \
  --out "$WORK/data/zs_csd" --tokenizer "$tok" --max_length 1024 --mode full --test_fraction 0 \
  --labels favor,against,neutral
python launch/experiment.py features --data "$WORK/data/zs_csd" --out "$CROWD_FEATURES/zs_csd" \
  --weights gguf:smollm2 --max_cases_per_event "$ZS_CASES" --seed 0 --chunk_size 16

# CED: every event with >= 50 responders; its crowd (target) = up to 200 of them, labelled by $LABELLER;
# the cases (authors with >= 5 other responses) in mode full (BM25-selected history).
if [ ! -d "$WORK/data/ced" ]; then
  [ -d "$WORK/CED_Dataset" ] || tar xzf "$SHARED/data/ced/CED_Dataset.tar.gz" -C "$WORK"
  python launch/build_dataset.py --source ced --input "$WORK/CED_Dataset" --out "$WORK/data/ced" \
    --tokenizer "$tok" --max_length 1024 --mode full --test_fraction 0 --labeller "$LABELLER" \
    --crowd_cap 200 --min_crowd 50
fi
python launch/experiment.py features --data "$WORK/data/ced" --out "$CROWD_FEATURES/ced" \
  --weights gguf:smollm2 --num_events "$CED_EVENTS" --max_cases_per_event "$CED_CASES" --seed 0 --chunk_size 32

for ds in zs_csd ced; do
  python launch/experiment.py --plan "experiments/crowd_$ds.toml" --out "$WORK/runs/$ds" --eval_md EVAL.md
done
