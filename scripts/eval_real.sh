#!/usr/bin/env bash
# Real-data evaluation (EVAL.md): SmolLM2-135M on ZS-CSD, train on training events, evaluate
# on held-out events, 4 adapters x {with, without} the macro loss = 8 rows. CPU-sized.
#
#   bash scripts/eval_real.sh                 # all rows, then the table into EVAL.md
#   ROWS="pac_token_macro base_macro" bash scripts/eval_real.sh
#   STEPS=40 SEED=1 bash scripts/eval_real.sh
#
# Rows already finished (their <workdir>/eval/metrics.json exists) are not rerun.
set -euo pipefail
cd "$(dirname "$0")/.."

INPUT=${INPUT:-$(cd .. && pwd)/shared/data/zs_csd}
RUNS=${RUNS:-/tmp/socialalign_eval_real}
STEPS=${STEPS:-10}
SEED=${SEED:-0}
ROWS=${ROWS:-"base_macro base_nomacro lora_macro lora_nomacro pac_token_macro pac_token_nomacro pac_pooled_macro pac_pooled_nomacro"}
DATA=$RUNS/data_seed$SEED
mkdir -p "$RUNS"

# One dataset for every row: built with SmolLM2's own tokenizer, held-out events fixed by SEED.
if [ ! -d "$DATA" ]; then
  [ -f "$RUNS/tokenizer/tokenizer.json" ] || python -c "from socialalign_jax.weights.resolve import resolve_weights as r; r('gguf:smollm2').tokenizer.save_pretrained('$RUNS/tokenizer')"
  python launch/build_dataset.py --source zs_csd --input "$INPUT" --out "$DATA" --tokenizer "$RUNS/tokenizer" \
    --max_length 384 --test_fraction 0.05 --on_overflow skip --seed "$SEED" | tee "$RUNS/data_seed$SEED.txt"
fi

COMMON=(--config configs/weibo.py:smollm2 --config.data.source=zs_csd "--config.data.input=$INPUT"
  --config.data.labels=favor,against,neutral "--config.data.data_dir=$DATA" --config.data.max_length=384
  --config.data.events_per_batch=2 --config.data.cases_per_event=4 "--config.train.num_steps=$STEPS"
  "--config.train.seed=$SEED" "--config.sample.seed=$SEED" --config.sample.max_new_tokens=32
  --config.train.labeller=none --config.loss.max_response_tokens=256 --config.train.eval_at_end=false
  --config.train.checkpoint_every=1000 --config.optim.lr=2e-4 --config.train.eval_max_examples=0
  --config.model.remat=true)

row_flags() {
  case "$1" in
    base_*)       echo "--config.lora.targets=" ;;
    lora_*)       echo "--config.lora.num_analyze=1 --config.lora.num_compose=1" ;;
    pac_token_*)  echo "--config.lora.routing=token" ;;
    pac_pooled_*) echo "--config.lora.routing=pooled" ;;
    *) echo "unknown row $1" >&2; exit 2 ;;
  esac
  case "$1" in
    *_nomacro) echo "--config.loss.lambda_macro=0" ;;
  esac
}

for row in $ROWS; do
  wd=$RUNS/seed$SEED/$row
  if [ -f "$wd/eval/metrics.json" ]; then echo "$row: done ($wd)"; continue; fi
  # shellcheck disable=SC2046
  flags=$(row_flags "$row" | tr '\n' ' ')
  echo "$row: python launch/train.py ${COMMON[*]} $flags --workdir $wd"
  mkdir -p "$wd"
  # shellcheck disable=SC2086
  python launch/train.py "${COMMON[@]}" $flags --workdir "$wd" --noprogress > "$wd.log" 2>&1 \
    || { echo "$row: failed, see $wd.log"; continue; }
done

python scripts/eval_real_collect.py --runs "$RUNS" --steps "$STEPS" --out EVAL.md
