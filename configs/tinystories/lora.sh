#!/usr/bin/env bash
# LoRA students on the real stories260K teacher (configs/tinystories/lora.yaml): held-out
# perplexity of (a) a LoRA student distilled (alpha 0.5), (b) the fully trained student from the
# same base (KD), (c) a CE-only LoRA student (alpha 1); each at its best LR of a 3-LR sweep
# (seed 0), the winners again with seed 1. Same base, data and steps for all.
#   configs/tinystories/lora.sh ../shared/realdata [NPROC]
# Prints every run's perplexity; writes runs/tinystories/lora-summary.json. About 9 min with
# OMP_NUM_THREADS=1 (caches of run.sh reused when present; docs/results.md has the table).
source "$(dirname "$0")/launch.sh"
T="[{path: $REAL/teacher-stories260K}]"
for split in train eval; do  # the caches of run.sh, made here when missing
  if [ "$split" = train ]; then DS="dataset.path=$REAL/tinystories/train_head.txt"
  else DS="dataset.path=$REAL/tinystories/valid_a.txt dataset.num_samples=600"; fi
  [ -f "$OUT/cache-$split/manifest.json" ] || "${LAUNCH[@]}" stages.precompute_teacher \
    --config configs/tinystories/precompute.yaml teachers="$T" $DS cache.dir=$OUT/cache-$split cache.overwrite=true
done
# the pretrained base: hidden 64, 2 layers, CE only on the first 800 paragraphs of train_head.txt
"$PY" -c "from pipeline.data.demo_corpus import llama_config; llama_config(512, 64, 2, 4, 2, 172, bos_token_id=1, eos_token_id=2).save_pretrained('$OUT/lora-base-init')"
[ -f "$OUT/lora-base/final/model.safetensors" ] || "${LAUNCH[@]}" stages.train_student \
  --config configs/tinystories/teacher2.yaml student.path=$OUT/lora-base-init output_dir=$OUT/lora-base \
  data.train_dataset.path=$REAL/tinystories/train_head.txt data.train_dataset.num_samples=800 \
  data.eval_dataset.path=$REAL/tinystories/valid_a.txt data.tokenizer=$REAL/teacher-stories260K max_steps=400
BASE=$OUT/lora-base/final
train() {  # NAME ALPHA LR SEED [overrides...]
  local name=$1 alpha=$2 lr=$3 seed=$4; shift 4
  [ -f "$OUT/lora-runs/$name-lr$lr-s$seed/summary.json" ] || "${LAUNCH[@]}" stages.train_student \
    --config configs/tinystories/lora.yaml student.path=$BASE loss.alpha=$alpha optim.lr=$lr seed=$seed \
    output_dir=$OUT/lora-runs/$name-lr$lr-s$seed "$@"
}
ppl() { "$PY" -c "import json,sys; print(json.load(open('$OUT/lora-runs/$1/summary.json'))['final_eval']['perplexity'])"; }
best() {  # NAME LR... -> the LR with the lowest seed-0 perplexity
  local name=$1 b="" bp=1e9; shift
  for lr in "$@"; do p=$(ppl "$name-lr$lr-s0"); if "$PY" -c "import sys; sys.exit(not $p < $bp)"; then b=$lr; bp=$p; fi; done
  echo "$b"
}
declare -A LRS=([lora-kd]="1e-2 3e-2 1e-1" [full-kd]="3e-3 1e-2 3e-2" [lora-ce]="1e-2 3e-2 1e-1")
declare -A ARGS=([lora-kd]="0.5" [full-kd]="0.5 student.lora=null" [lora-ce]="1.0")
for name in lora-kd full-kd lora-ce; do
  set -- ${ARGS[$name]}
  for lr in ${LRS[$name]}; do train "$name" "$1" "$lr" 0 "${@:2}"; done
  lr=$(best "$name" ${LRS[$name]})
  train "$name" "$1" "$lr" 1 "${@:2}"
done
"$PY" - "$OUT" <<'PY'
import json, math, sys
from pathlib import Path
from pipeline.cache import read_manifest
out = Path(sys.argv[1])
m = read_manifest(out / "cache-eval")
base = json.loads((out / "lora-base" / "summary.json").read_text())
res = {"teacher_ppl": m.teacher_perplexity,
       "base_ppl": base["final_eval"]["perplexity"], "runs": {}}
for run in sorted((out / "lora-runs").glob("*-lr*-s*")):
    s = json.loads((run / "summary.json").read_text())
    res["runs"][run.name] = {"ppl": s["final_eval"]["perplexity"], "train_s": round(s["train_seconds"], 1),
                                          "params": s["num_parameters"]}
print(json.dumps(res, indent=1))
(out / "lora-summary.json").write_text(json.dumps(res, indent=1))
PY
