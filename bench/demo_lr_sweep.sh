#!/usr/bin/env bash
# Learning-rate sweep of the demo students (CE only vs distilled), after `make demo` has built
# the teacher and the caches. Same data, same 250 steps, per seed; prints one line per run.
#   bench/demo_lr_sweep.sh "2e-3 4e-3 8e-3 1.6e-2" "0"
set -euo pipefail
LRS=${1:-"2e-3 4e-3 8e-3"}
SEEDS=${2:-0}
PY=${PY:-.venv/bin/python}
OUT=runs/lr-sweep
mkdir -p $OUT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=disabled
for seed in $SEEDS; do for lr in $LRS; do for alpha in 1.0 0.5; do
  run=$OUT/a$alpha-lr$lr-s$seed
  "$PY" -m stages.train_student --config configs/demo/student.yaml output_dir=$run loss.alpha=$alpha \
    optim.lr=$lr seed=$seed wandb.mode=disabled > $run.log 2>&1
  "$PY" -c "import json,sys; s=json.load(open('$run/summary.json')); print(f'alpha={$alpha} lr=$lr seed=$seed held-out ppl {s[\"final_eval\"][\"perplexity\"]:.2f}')"
done; done; done
