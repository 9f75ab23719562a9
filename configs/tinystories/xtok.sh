#!/usr/bin/env bash
# Cross-tokenizer distillation on the real stories260K teacher (512-token SentencePiece BPE)
# into a student with its own byte-level BPE (2,048 tokens, trained with `tokenizers` on
# train_head.txt): CE only vs loss.cross_tokenizer gold vs uld, each at its best learning rate
# (seed-0 sweep), then 2 seeds; compared in bits per byte on held-out TinyStories paragraphs
# (tokenizers differ, so perplexities do not compare).
#   configs/tinystories/xtok.sh ../shared/realdata [NPROC]
# Writes runs/tinystories-xtok/<ce|gold|uld>-s<seed>/final (student + its tokenizer) and
# runs/tinystories-xtok/summary.json. For a quick check of the script, override the sweep
# (LRS), the run length (STEPS), the training paragraphs (TRAIN_N) and the scored paragraphs (BPB_N).
source "$(dirname "$0")/launch.sh"
OUT=runs/tinystories-xtok
mkdir -p "$OUT"
LRS=${LRS:-"3e-3 6e-3 1.2e-2"}
STEPS=${STEPS:-400}
BPB_N=${BPB_N:-1000}
SUBSET=${TRAIN_N:+dataset.num_samples=$TRAIN_N}
"$PY" - "$REAL" "$OUT" <<'PY'
import sys
from pathlib import Path
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from pipeline.data.demo_corpus import llama_config
real, out = Path(sys.argv[1]), Path(sys.argv[2])
paras = [p for p in (real / "tinystories/train_head.txt").read_text().split("\n\n") if p.strip()]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(paras, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|bos|>", "<|eos|>"],
                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>")
fast.save_pretrained(out / "student-init")
# the size of run.sh's student (hidden 32, 3 layers), with the 2,048-token vocabulary
llama_config(len(fast), 32, 3, 4, 2, 86, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id).save_pretrained(out / "student-init")
PY
T="[{path: $REAL/teacher-stories260K}]"
"${LAUNCH[@]}" stages.precompute_teacher --config configs/tinystories/precompute.yaml teachers="$T" \
  dataset.path="$REAL/tinystories/train_head.txt" cache.dir=$OUT/cache-train cache.text_offsets=true cache.overwrite=true $SUBSET
"${LAUNCH[@]}" stages.precompute_teacher --config configs/tinystories/precompute.yaml teachers="$T" \
  dataset.path="$REAL/tinystories/valid_a.txt" dataset.num_samples=600 cache.dir=$OUT/cache-eval \
  cache.text_offsets=true cache.overwrite=true
train() {  # NAME ALPHA MODE LR SEED DIR
  "${LAUNCH[@]}" stages.train_student --config configs/tinystories/student.yaml student.path=$OUT/student-init \
    data.train_cache=$OUT/cache-train data.eval_cache=$OUT/cache-eval data.tokenizer=$OUT/student-init \
    loss.alpha=$2 loss.cross_tokenizer=$3 optim.lr=$4 seed=$5 max_steps=$STEPS output_dir=$6
}
# CE only still reads the cross-tokenizer cache (its text, in the student's tokens): alpha 1 trains no teacher term
MODES="ce:1.0:uld gold:0.5:gold uld:0.5:uld"
for spec in $MODES; do  # learning-rate sweep, seed 0, by the eval loss's CE (same tokenizer for every mode)
  IFS=: read -r name alpha mode <<< "$spec"
  for lr in $LRS; do train $name $alpha $mode $lr 0 $OUT/sweep/$name-lr$lr; done
done
"$PY" - "$OUT" "$LRS" <<'PY' > $OUT/best_lr.txt
import json, sys
from pathlib import Path
out, lrs = Path(sys.argv[1]), sys.argv[2].split()
for name in ("ce", "gold", "uld"):
    ce = {lr: json.loads((out / "sweep" / f"{name}-lr{lr}" / "summary.json").read_text())["final_eval"]["ce_loss"] for lr in lrs}
    print(name, min(ce, key=ce.get))
PY
for seed in 0 1; do
  for spec in $MODES; do
    IFS=: read -r name alpha mode <<< "$spec"
    lr=$(awk -v n=$name '$1 == n {print $2}' $OUT/best_lr.txt)
    train $name $alpha $mode $lr $seed $OUT/$name-s$seed
  done
done
# bits per byte on BPB_N (1,000) held-out paragraphs after the 600 of the eval cache; the teacher for reference
for d in $REAL/teacher-stories260K $OUT/{ce,gold,uld}-s{0,1}/final; do
  "$PY" bench/bits_per_byte.py "$d" "$REAL/tinystories/valid_a.txt" --skip 600 --n $BPB_N
done > $OUT/bits_per_byte.jsonl
"$PY" - "$OUT" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "bits_per_byte.jsonl").read_text().splitlines()]
best = dict(l.split() for l in (out / "best_lr.txt").read_text().splitlines())
res = {"teacher_bits_per_byte": rows[0]["bits_per_byte"]}
for name in ("ce", "gold", "uld"):
    per_seed = [r["bits_per_byte"] for r in rows if f"/{name}-s" in r["model"]]
    res[name] = {"lr": float(best[name]), "bits_per_byte_per_seed": per_seed, "mean": statistics.mean(per_seed),
                 "spread": max(per_seed) - min(per_seed)}
(out / "summary.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
PY
