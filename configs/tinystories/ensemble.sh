#!/usr/bin/env bash
# Ensemble distillation end to end on real data: train a second teacher (CE only, stories260K
# tokenizer), cache the 0.8/0.2 mixture of stories260K and it, distil the run.sh student from it.
#   configs/tinystories/ensemble.sh ../shared/realdata [NPROC]
# Prints the perplexities (teacher2, ensemble, student) and writes runs/tinystories/ensemble-summary.json.
source "$(dirname "$0")/launch.sh"
"$PY" -c "from pipeline.data.demo_corpus import llama_config as c
c(512, 64, 2, 8, 4, 172, bos_token_id=1, eos_token_id=2).save_pretrained('$OUT/teacher2-init')
c(512, 32, 3, 4, 2, 86, bos_token_id=1, eos_token_id=2).save_pretrained('$OUT/student-init')"
"${LAUNCH[@]}" stages.train_student --config configs/tinystories/teacher2.yaml student.path=$OUT/teacher2-init \
  data.train_dataset.path="$REAL/tinystories/train_head.txt" data.eval_dataset.path="$REAL/tinystories/valid_a.txt" \
  data.tokenizer="$REAL/teacher-stories260K" output_dir=$OUT/teacher2
T="[{path: $REAL/teacher-stories260K, weight: 0.8}, {path: $OUT/teacher2/final, weight: 0.2}]"
"${LAUNCH[@]}" stages.precompute_teacher --config configs/tinystories/ensemble.yaml teachers="$T" \
  dataset.path="$REAL/tinystories/train_head.txt" cache.dir=$OUT/ens-cache-train cache.overwrite=true
"${LAUNCH[@]}" stages.precompute_teacher --config configs/tinystories/ensemble.yaml teachers="$T" \
  dataset.path="$REAL/tinystories/valid_a.txt" dataset.num_samples=600 cache.dir=$OUT/ens-cache-eval cache.overwrite=true
"${LAUNCH[@]}" stages.train_student --config configs/tinystories/student.yaml student.path=$OUT/student-init \
  data.train_cache=$OUT/ens-cache-train data.eval_cache=$OUT/ens-cache-eval optim.lr=6e-3 seed=0 \
  output_dir=$OUT/student-ens-s0
"$PY" - "$OUT" <<'PY'
import json, math, sys
from pathlib import Path
from pipeline.cache import read_manifest
out = Path(sys.argv[1])
m = read_manifest(out / "ens-cache-eval")
res = {"teacher2_ppl": json.loads((out / "teacher2" / "summary.json").read_text())["final_eval"]["perplexity"],
       "ensemble_ppl": m.teacher_perplexity,
       "weights": [t.weight for t in m.teachers], "combine": m.combine,
       "student_from_ensemble_ppl": json.loads((out / "student-ens-s0" / "summary.json").read_text())["final_eval"]["perplexity"]}
(out / "ensemble-summary.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
PY
