"""Student step throughput on a cross-tokenizer cache ÷ on a same-tokenizer cache of the same text.

Both caches hold the same paragraphs (the standard-library corpus of ``pipeline.data.demo_corpus``, or
TinyStories ``train_head.txt`` with ``--realdata``) with top-k targets of a random tiny Llama
teacher (the targets' values do not change the step's cost):

* ``same``: written with the student's tokenizer (a byte-level BPE of ``--student-vocab``
  tokens); train-student reads the targets as they are (``loss.tail: bucket``).
* ``xtok``: written with another tokenizer (a SentencePiece-style ▁-metaspace BPE of
  ``--teacher-vocab`` tokens) and ``cache.text_offsets``; train-student re-tokenizes each sample,
  aligns and maps it in the loader threads and trains ``loss.cross_tokenizer: gold`` (or
  ``--mode uld``).

The same student (a tied Llama of ``--hidden`` / ``--layers``) trains ``--steps`` steps on each,
one child process per run, the two alternating over ``--rounds``; tokens/s is the median of
``train/tokens_per_second`` (the student's valid target tokens per step's wall time, loading
included) over the steps after ``--warmup``. The ratio is xtok ÷ same, per round and its median.
Goal: ≥ 0.8×. The machines are shared and noisy: measure on a quiet one.

Run (from the repository root)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/xtok_bench.py [--realdata ../shared/realdata]
    .venv/bin/python bench/xtok_bench.py --tiny      # a quick check that it runs (no numbers)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def texts(realdata: str | None, n: int) -> list[str]:
    """``n`` paragraphs: TinyStories' ``train_head.txt`` or the standard-library corpus."""
    if realdata:
        paras = [p.strip() for p in (Path(realdata) / "tinystories/train_head.txt").read_text().split("\n\n")]
        return [p for p in paras if p][:n]
    from pipeline.data.demo_corpus import build_corpus

    with tempfile.TemporaryDirectory() as d:
        return list(build_corpus(Path(d) / "c", max_chars=600, heldout_fraction=0.0, limit_files=40)["train"]["text"][:n])


def tokenizers(paras: list[str], teacher_vocab: int, student_vocab: int, out: Path) -> tuple[Path, Path]:
    """A ▁-metaspace BPE (the teacher's) and a byte-level BPE (the student's), saved under ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.data.demo_corpus import train_tokenizer

    train_tokenizer(paras, student_vocab, out / "student-tok")
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    tok.train_from_iterator(paras, trainers.BpeTrainer(vocab_size=teacher_vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out / "teacher-tok")
    return out / "teacher-tok", out / "student-tok"


def model_dir(tok_dir: Path, out: Path, hidden: int, layers: int, seed: int = 0) -> Path:
    """A random tied Llama over ``tok_dir``'s vocabulary, saved with the tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.demo_corpus import llama_config

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = llama_config(len(tok), hidden, layers, 4, 2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id or 0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(args: list[str]) -> None:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{res.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--realdata", default=None)
    ap.add_argument("--paragraphs", type=int, default=1024)
    ap.add_argument("--teacher-vocab", type=int, default=512)
    ap.add_argument("--student-vocab", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mode", choices=["gold", "uld"], default="gold")
    ap.add_argument("--tiny", action="store_true", help="a seconds-long check that the bench runs")
    a = ap.parse_args(argv)
    if a.tiny:
        a.paragraphs, a.student_vocab, a.teacher_vocab, a.hidden, a.layers = 64, 320, 300, 16, 1
        a.k, a.batch, a.steps, a.warmup, a.rounds = 8, 4, 4, 1, 1
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        paras = texts(a.realdata, a.paragraphs)
        (d / "text.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
        t_tok, s_tok = tokenizers(paras, a.teacher_vocab, a.student_vocab, d)
        caches = {}
        for name, tok, off in (("same", s_tok, False), ("xtok", t_tok, True)):
            teacher = model_dir(tok, d / f"teacher-{name}", 32, 1)
            cfg = {"teachers": [{"path": str(teacher)}], "batch_size": 16, "device": "cpu", "teacher_check": "warn",
                   "dataset": {"path": str(d / "text.jsonl"), "max_length": 256},
                   "cache": {"dir": str(d / f"cache-{name}"), "k": a.k, "text_offsets": off}}
            (d / f"pre-{name}.yaml").write_text(yaml.safe_dump(cfg))
            run(["stages.precompute_teacher", "--config", str(d / f"pre-{name}.yaml")])
            caches[name] = d / f"cache-{name}"
        student = model_dir(s_tok, d / "student", a.hidden, a.layers, seed=1)
        rates: dict[str, list[float]] = {"same": [], "xtok": []}
        for r in range(a.rounds):
            for name in (("same", "xtok") if r % 2 == 0 else ("xtok", "same")):
                out = d / f"run-{name}-{r}"
                cfg = {"output_dir": str(out), "student": {"path": str(student), "init": "random"},
                       "data": {"train_cache": str(caches[name]), "tokenizer": str(s_tok)},
                       "loss": {"alpha": 0.5, **({"cross_tokenizer": a.mode} if name == "xtok" else {})},
                       "micro_batch_size": a.batch, "max_steps": a.steps, "log_steps": 1, "device": "cpu",
                       "save_steps": 10**6, "wandb": {"mode": "disabled"}}
                (d / "t.yaml").write_text(yaml.safe_dump(cfg))
                run(["stages.train_student", "--config", str(d / "t.yaml")])
                steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                tps = [m["train/tokens_per_second"] for m in steps if "train/tokens_per_second" in m][a.warmup:]
                rates[name].append(statistics.median(tps))
        ratios = [x / s for x, s in zip(rates["xtok"], rates["same"])]
        print(json.dumps({"same_tokens_per_s": rates["same"], "xtok_tokens_per_s": rates["xtok"],
                          "ratio_per_round": ratios, "ratio_median": statistics.median(ratios),
                          "threads": os.environ.get("OMP_NUM_THREADS"), "tiny": a.tiny, "mode": a.mode}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
