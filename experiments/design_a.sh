#!/usr/bin/env bash
# Design A end to end (docs/experiments.md): datasets, frozen-feature caches, both plans (and their
# 2000-step variants), the tables written into EVAL.md.
# Every stage resumes: a built dataset is kept, a feature cache continues at its first missing
# chunk, a plan skips the cells already in its cells.jsonl.
#   bash experiments/design_a.sh [WORK_DIR]      # default /tmp/socialalign_design_a
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/socialalign_design_a}
SHARED=${SHARED:-$(cd .. && pwd)/shared}
export DESIGN_A_FEATURES=$WORK/features
mkdir -p "$WORK"
tok=$WORK/tokenizer
[ -f "$tok/tokenizer.json" ] || python -c "from socialalign_jax.weights.resolve import resolve_weights as r; r('gguf:smollm2').tokenizer.save_pretrained('$tok')"

# ZS-CSD: 45 targets, the authors' prompt without the history block (as the smollm2 preset),
# at most 4 responses per target (SmolLM2 spends ~2 tokens per Chinese character: ~330-token prompts).
[ -d "$WORK/data/zs_csd" ] || python launch/build_dataset.py --source zs_csd --input "$SHARED/data/zs_csd" \
  --out "$WORK/data/zs_csd" --tokenizer "$tok" --max_length 512 --mode without_history --test_fraction 0 \
  --labels favor,against,neutral
python launch/experiment.py features --data "$WORK/data/zs_csd" --out "$DESIGN_A_FEATURES/zs_csd" \
  --weights gguf:smollm2 --max_cases_per_event 4 --seed 0 --chunk_size 16

# CED: silver (SnowNLP) labels, targets from the cases alone (--crowd_cap 0: design A predates the crowds); the 503 events with a response that fits 512 tokens; 500 of them, one response each.
if [ ! -d "$WORK/data/ced" ]; then
  [ -d "$WORK/CED_Dataset" ] || tar xzf "$SHARED/data/ced/CED_Dataset.tar.gz" -C "$WORK"
  python launch/build_dataset.py --source ced --input "$WORK/CED_Dataset" --out "$WORK/data/ced" \
    --tokenizer "$tok" --max_length 512 --mode without_history --test_fraction 0 --labeller snownlp --crowd_cap 0
fi
python launch/experiment.py features --data "$WORK/data/ced" --out "$DESIGN_A_FEATURES/ced" \
  --weights gguf:smollm2 --num_events 500 --max_cases_per_event 1 --seed 0 --chunk_size 32

# Each plan at its budget (600 steps) and 3.3x longer (2000 steps), tables written into EVAL.md.
for ds in zs_csd ced; do
  python launch/experiment.py --plan "experiments/design_a_$ds.toml" --out "$WORK/runs/$ds" --eval_md EVAL.md
  title=$(sed -n 's/^title = "\(.*\)"$/\1/p' "experiments/design_a_$ds.toml")
  python launch/experiment.py --plan "experiments/design_a_$ds.toml" --out "$WORK/runs/${ds}_2000" \
    --set defaults.steps=2000 --set "name=design_a_${ds}_2000" --set "title=\"$title, 2000 steps\"" --eval_md EVAL.md
done
