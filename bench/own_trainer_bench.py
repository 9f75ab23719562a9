"""The Hugging Face ``KDTrainer`` (pipeline/kd) against ``train-student``, measured in one run.

Both train the same student (a Llama from ``llama_config``, random init with the same seed)
from the same parquet cache (random top-k targets, ``bench/student_step.py``'s ``write_cache``)
on the same schedule: one process, float32, micro-batches of ``--micro-batch`` samples,
``--accum`` per optimizer step, AdamW with a constant LR, clipping at 1, α = 0.5, τ = 1, the
same sample order (``KDTrainer`` visits train-student's order), so every step trains on the
same valid tokens and the two runs' losses agree (printed as a check).

* ``train-student``: :func:`pipeline.student.loop.train` (the stage's whole loop: its
  prefetching loader, loss logs, metrics), plain module at one rank. **The baseline.**
* ``kd-trainer``: ``pipeline.kd.KDTrainer`` with the ``TrainingArguments`` defaults for
  everything else (``dataloader_num_workers=0``: batches are read and collated on the training
  thread), and with ``--workers`` DataLoader worker processes (``kd-trainer-wN``).

Valid target tokens per second over the steps after ``--warmup``, timed from one step's end
to the next (data, forward, backward, optimizer and each trainer's bookkeeping). Each mode runs
in a fresh child process; ``--rounds`` repeats the set in alternating order and reports medians.
Torch threads come from ``OMP_NUM_THREADS`` (default 1: the machines are shared).

Run (from the repository root)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/own_trainer_bench.py            # V = 32,000, 8 × 256
    OMP_NUM_THREADS=1 .venv/bin/python bench/own_trainer_bench.py --quick    # minutes: V = 512, 4 × 128
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STUDENTS = {"v32k": dict(vocab=32000, hidden=256, layers=4, heads=4, kv_heads=2, ffn=512),
            "v512": dict(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, ffn=172)}
SEED, LR = 0, 1e-3


class StepClock:
    """A train-student callback: the time and the tokens trained so far at every step's end."""

    def __init__(self):
        self.t, self.tokens, self.loss = [], [], []

    def on_step_end(self, state, metrics):
        self.t.append(time.perf_counter())
        self.tokens.append(state.tokens)
        self.loss.append(metrics["train/loss"])


def run_train_student(spec: dict, out: Path) -> dict:
    from pipeline.config import TrainStudentConfig
    from pipeline.distributed import init_distributed, teardown
    from pipeline.student.loop import train

    cfg = TrainStudentConfig(output_dir=str(out), student={"path": spec["student"]}, data={"train_cache": spec["cache"]},
                             micro_batch_size=spec["micro_batch"], grad_accum_steps=spec["accum"],
                             max_steps=spec["warmup"] + spec["steps"], eval_steps=10**6, log_steps=10**6, seed=SEED,
                             device="cpu", loss={"alpha": 0.5},
                             optim={"lr": LR, "warmup_steps": 0, "schedule": "constant", "max_grad_norm": 1.0})
    clock = StepClock()
    train(cfg, init_distributed("cpu"), callbacks=[clock])
    teardown()
    return {"t": clock.t, "tokens": list(np.diff([0] + clock.tokens)), "loss": clock.loss}


def run_kd_trainer(spec: dict, out: Path, workers: int) -> dict:
    from transformers import TrainerCallback, TrainingArguments

    from pipeline.kd import CacheDataset, KDTrainer
    from pipeline.models import build_student

    t, step_tokens = [], []

    class Counting(KDTrainer):
        def get_batch_samples(self, epoch_iterator, num_batches, device):
            batches, n = super().get_batch_samples(epoch_iterator, num_batches, device)
            step_tokens.append(int(n))
            return batches, n

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            t.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=spec["micro_batch"],
                             gradient_accumulation_steps=spec["accum"], max_steps=spec["warmup"] + spec["steps"],
                             learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                             weight_decay=0.1, adam_beta2=0.95,  # train-student's defaults (HF's: 0, 0.999)
                             logging_steps=1, save_strategy="no", seed=SEED, report_to="none", use_cpu=True,
                             disable_tqdm=True, dataloader_num_workers=workers, dataloader_pin_memory=False)
    model = build_student(spec["student"], "random", SEED)  # train-student's initial weights
    trainer = Counting(model=model, args=args, train_dataset=CacheDataset(spec["cache"]), callbacks=[Clock()])
    trainer.train()
    return {"t": t, "tokens": step_tokens, "loss": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def child(spec: dict) -> dict:
    """One mode in this (fresh) process; tokens/s over the steps after ``warmup``."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as d:
        if spec["mode"] == "train-student":
            r = run_train_student(spec, Path(d))
        else:
            r = run_kd_trainer(spec, Path(d), spec.get("workers", 0))
    w = spec["warmup"]
    dt = np.diff(r["t"])[w - 1:]  # step w+1 onwards: from the end of step w
    return {"tok_s": float(sum(r["tokens"][w:]) / dt.sum()), "step_s": float(np.median(dt)), "loss": r["loss"],
            "tokens": int(sum(r["tokens"][w:]))}


def run_child(spec: dict) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)})
    if res.returncode != 0:
        raise RuntimeError(f"{spec['mode']} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def build_fixture(root: Path, student: str, n: int, length: int) -> tuple[str, str]:
    """(cache dir, student config dir): ``n`` samples of ``length`` random tokens."""
    from bench.student_step import write_cache
    from pipeline.data.demo_corpus import llama_config

    st = STUDENTS[student]
    rng = np.random.default_rng(0)
    cache = write_cache(root / "cache", [list(rng.integers(3, st["vocab"], length)) for _ in range(n)], st["vocab"])
    llama_config(st["vocab"], st["hidden"], st["layers"], st["heads"], st["kv_heads"], st["ffn"],
                 context=length).save_pretrained(root / "student")
    return str(cache), str(root / "student")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--quick", action="store_true", help="V = 512 student, 4 × 128 tokens, 8 steps")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--workers", type=int, default=2, help="also run kd-trainer with N DataLoader workers (0: not)")
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    student, mb, length = ("v512", 4, 128) if a.quick else ("v32k", 8, 256)
    steps, rounds, accum = a.steps or (8 if a.quick else 12), a.rounds or (1 if a.quick else 2), 2
    with tempfile.TemporaryDirectory() as d:
        n = mb * accum * (a.warmup + steps)
        cache, student_dir = build_fixture(Path(d), student, n, length)
        base = {"cache": cache, "student": student_dir, "micro_batch": mb, "accum": accum, "warmup": a.warmup,
                "steps": steps}
        modes = [{"mode": "train-student"}, {"mode": "kd-trainer"}]
        if a.workers:
            modes.append({"mode": f"kd-trainer-w{a.workers}", "workers": a.workers})
        runs: dict[str, list[dict]] = {m["mode"]: [] for m in modes}
        for r in range(rounds):
            for m in (modes if r % 2 == 0 else modes[::-1]):
                runs[m["mode"]].append(run_child({**base, **m}))
    st = STUDENTS[student]
    print(f"student {student} (V={st['vocab']}, hidden {st['hidden']}, {st['layers']} layers), {mb} x {length} tokens, "
          f"{accum} micro-batches/step, {steps} steps after {a.warmup}; {rounds} round(s); "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}")
    ref = statistics.median(x["tok_s"] for x in runs["train-student"])
    ts_loss = runs["train-student"][0]["loss"]
    for mode, rs in runs.items():
        tok_s = statistics.median(x["tok_s"] for x in rs)
        dloss = max(abs(x - y) for x, y in zip(rs[0]["loss"], ts_loss))
        print(f"  {mode:18s} {tok_s:10.0f} tok/s  step {statistics.median(x['step_s'] for x in rs):.3f}s  "
              f"ratio {tok_s / ref:.2f}x  max |loss - train-student's| {dloss:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
