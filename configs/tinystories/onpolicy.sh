#!/usr/bin/env bash
# On-policy distillation against off-policy KD and sequence-level KD on the real teacher
# (stories260K) and TinyStories, at equal student steps after a shared round 0.
#   configs/tinystories/onpolicy.sh REALDATA_DIR
# Round 0 (every variant starts from it): off-policy KD on human text (train_head.txt), R0_STEPS.
# Then STEPS more optimizer steps each, per seed:
#   offpolicy  more off-policy KD on human text (train-student from round 0's final/)
#   seqkd      sequence-level KD: distill-rounds, 1 round, completions of the teacher
#   onpolicy   distill-rounds, ROUNDS rounds of STEPS/ROUNDS steps, the student's own completions,
#              loss.divergence=$DIVERGENCE (reverse_kl or jsd)
#   mixed      as onpolicy, each round's cache mixed 1:1 with the human-text cache (GKD's λ = 0.5)
# Prompts: the first 16 tokens of train_head.txt paragraphs. Metrics on held-out openings of
# valid_a.txt (paragraphs after the 600 of the eval cache): the teacher's NLL per token of the
# student's sampled continuations, distinct-2 of them, and held-out perplexity (eval cache).
# Writes runs/tinystories-onpolicy/<offpolicy|seqkd|onpolicy|mixed>-s<seed>/final and
# runs/tinystories-onpolicy/table.md. Learning rates: LR_* (tune each with a sweep first).
# SMOKE=1: a few steps and prompts, one seed (checks that the script runs; numbers mean nothing).
set -euo pipefail
REAL=${1:?usage: $0 REALDATA_DIR}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/tinystories-onpolicy}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=${WANDB_MODE:-disabled}
DIVERGENCE=${DIVERGENCE:-reverse_kl}
if [ "${SMOKE:-0}" = 1 ]; then
  SEEDS=${SEEDS:-0}; R0_STEPS=4; STEPS=4; ROUNDS=2; PROMPTS=16; NEW_TOKENS=24; EVAL_PARAS=32; MB=4
else
  SEEDS=${SEEDS:-"0 1"}; R0_STEPS=${R0_STEPS:-400}; STEPS=${STEPS:-400}; ROUNDS=${ROUNDS:-4}
  PROMPTS=${PROMPTS:-512}; NEW_TOKENS=${NEW_TOKENS:-64}; EVAL_PARAS=600; MB=16
fi
LR_OFF=${LR_OFF:-6e-3}; LR_SEQ=${LR_SEQ:-6e-3}; LR_ON=${LR_ON:-6e-3}; LR_MIX=${LR_MIX:-6e-3}
PER_ROUND=$((STEPS / ROUNDS))
mkdir -p "$OUT"
T="[{path: $REAL/teacher-stories260K}]"
"$PY" -c "from pipeline.data.demo_corpus import llama_config; llama_config(512, 32, 3, 4, 2, 86, bos_token_id=1, eos_token_id=2).save_pretrained('$OUT/student-init')"
complete() { grep -qs '"complete": true' "$1/manifest.json"; }  # a rerun keeps finished caches
complete $OUT/cache-human || "$PY" -m stages.precompute_teacher --config configs/tinystories/precompute.yaml \
  teachers="$T" dataset.path="$REAL/tinystories/train_head.txt" cache.dir=$OUT/cache-human
complete $OUT/cache-eval || "$PY" -m stages.precompute_teacher --config configs/tinystories/precompute.yaml \
  teachers="$T" dataset.path="$REAL/tinystories/valid_a.txt" dataset.num_samples=$EVAL_PARAS cache.dir=$OUT/cache-eval
TRAIN=(--config configs/tinystories/student.yaml data.train_cache=$OUT/cache-human data.eval_cache=$OUT/cache-eval
       micro_batch_size=$MB eval_steps=$STEPS)
# the stage configs distill-rounds builds on (paths here; per-round changes in the driver config)
cat > "$OUT/generate.yaml" <<YAML
model: $REAL/teacher-stories260K
output_dir: unused
dataset: {path: $REAL/tinystories/train_head.txt, sample_by: paragraph, text_field: text, max_length: 256, num_samples: $PROMPTS}
prompt_tokens: 16
sampling: {num_completions: 1, max_new_tokens: $NEW_TOKENS, temperature: 1.0}
batch_size: 32
YAML
sed -e "s#REQUIRED-teacher-dir#$REAL/teacher-stories260K#" -e "s#REQUIRED-text-file#unused#" \
  configs/tinystories/precompute.yaml > "$OUT/precompute.yaml"
for seed in $SEEDS; do
  "$PY" -m stages.train_student "${TRAIN[@]}" student.path=$OUT/student-init max_steps=$R0_STEPS \
    optim.lr=$LR_OFF seed=$seed output_dir=$OUT/round0-s$seed
  R0=$OUT/round0-s$seed/final
  "$PY" -m stages.train_student "${TRAIN[@]}" student.path=$R0 student.init=pretrained max_steps=$STEPS \
    optim.lr=$LR_OFF seed=$seed output_dir=$OUT/offpolicy-s$seed
  for variant in seqkd onpolicy mixed; do
    case $variant in
      seqkd) n=1; steps=$STEPS; lr=$LR_SEQ; div=forward_kl; plan="{model: teacher}";;
      onpolicy) n=$ROUNDS; steps=$PER_ROUND; lr=$LR_ON; div=$DIVERGENCE; plan="{model: student}";;
      mixed) n=$ROUNDS; steps=$PER_ROUND; lr=$LR_MIX; div=$DIVERGENCE
             plan="{model: student, extra_caches: [{path: $OUT/cache-human, weight: 1.0}]}";;
    esac
    sed -e "s#REQUIRED-student-config-dir#$R0#" -e "s#init: random#init: pretrained#" \
      configs/tinystories/student.yaml > "$OUT/$variant-s$seed-train.yaml"
    cat > "$OUT/$variant-s$seed-rounds.yaml" <<YAML
output_dir: $OUT/$variant-s$seed-rounds
rounds: $n
generate: {config: $OUT/generate.yaml, overrides: {sampling: {seed: $((seed * 1000))}}}
precompute: {config: $OUT/precompute.yaml}
train:
  config: $OUT/$variant-s$seed-train.yaml
  overrides: {data: {eval_cache: $OUT/cache-eval}, micro_batch_size: $MB, max_steps: $steps, eval_steps: $steps,
              optim: {lr: $lr}, seed: $seed, loss: {divergence: $div}}
default_round: $plan
YAML
    "$PY" -m stages.distill_rounds --config "$OUT/$variant-s$seed-rounds.yaml"
    mkdir -p "$OUT/$variant-s$seed"
    rm -rf "$OUT/$variant-s$seed/final"
    cp -r "$OUT/$variant-s$seed-rounds/round-$((n - 1))/student/final" "$OUT/$variant-s$seed/final"
    cp "$OUT/$variant-s$seed-rounds/round-$((n - 1))/student/summary.json" "$OUT/$variant-s$seed/summary.json"
  done
done
"$PY" - "$OUT" "$REAL" "$EVAL_PARAS" "$NEW_TOKENS" "$SEEDS" <<'PY'
import json, statistics, sys
from pathlib import Path
sys.path.insert(0, "bench")
from divergence_quality import generation_quality
from transformers import AutoModelForCausalLM, AutoTokenizer
out, real, skip, new_tokens, seeds = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5].split()
teacher = AutoModelForCausalLM.from_pretrained(real / "teacher-stories260K").eval()
tok = AutoTokenizer.from_pretrained(real / "teacher-stories260K")
paras = [p.strip() for p in (real / "tinystories" / "valid_a.txt").read_text().split("\n\n") if p.strip()]
ids = [tok(p)["input_ids"] for p in paras[skip:]]  # held out: after the eval cache's paragraphs
prompts = [x[:16] for x in ids if len(x) > 16][:200 if len(seeds) > 1 else 32]
rows = []
for v in ("offpolicy", "seqkd", "onpolicy", "mixed"):
    per = []
    for s in seeds:
        q = generation_quality(str(out / f"{v}-s{s}" / "final"), teacher, prompts, new_tokens, int(s))
        q["ppl"] = json.loads((out / f"{v}-s{s}" / "summary.json").read_text())["final_eval"]["perplexity"]
        per.append(q)
    rows.append((v, *(statistics.mean(q[k] for q in per) for k in ("teacher_nll", "distinct_2", "ppl")), per))
lines = ["| variant | teacher NLL of own samples (nats/token) | distinct-2 | held-out perplexity | per seed (NLL, d-2, ppl) |",
         "|---|---|---|---|---|"]
for v, nll, d2, ppl, per in rows:
    seedcol = "; ".join(f"{q['teacher_nll']:.3f}, {q['distinct_2']:.3f}, {q['ppl']:.2f}" for q in per)
    lines.append(f"| {v} | {nll:.3f} | {d2:.3f} | {ppl:.2f} | {seedcol} |")
(out / "table.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
