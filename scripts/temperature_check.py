"""Cache temperature × training temperature, end to end through the two CLIs.

For every cache temperature ``T_c`` and training temperature ``τ`` in {0.5, 1, 2}, every
``k`` in {16, V} and both tail modes, this writes a cache with ``precompute-teacher`` (float32
values) from a tiny untied Llama teacher, runs one optimizer step of ``train-student``
(``loss.alpha: 0``) from a saved student, and compares the logged step-1 ``kl_sum`` of every
sample with the float64 KL computed here from the two models' own ``forward().logits``:

* ``bucket``: ``Σ_S p log(p/q) + p_tail log(p_tail/q_tail)`` with ``p = softmax(z_teacher/τ)``,
  ``q = softmax(z_student/τ)``, S the teacher's top-k ids, ``p_tail = 1 − Σ_S p``;
* ``renormalize``: ``Σ_S p̃ log(p̃/q)`` with ``p̃ = p_S / Σ_S p``.

Where the docs call the mode exact (renormalize always; bucket at ``τ = T_c`` or ``k = V``)
the relative error must be ≤ 1e-3; elsewhere the run must be refused with a message naming both
temperatures. Prints one table and exits 1 if any case fails.

    python scripts/temperature_check.py [--work DIR] [--jobs 2]
"""
from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TEMPS = (0.5, 1.0, 2.0)
TOL = 1e-3


def build(work: Path) -> dict:
    """Corpus, tokenizer, an untied teacher (peaked: output layer scaled) and a saved student."""
    from transformers import AutoModelForCausalLM

    from pipeline.data.demo_corpus import build_corpus, llama_config, train_tokenizer

    dd = build_corpus(work / "corpus", max_chars=300, heldout_fraction=0.2, limit_files=12)
    tok = train_tokenizer(dd["train"]["text"][:], 320, work / "tokenizer")
    torch.manual_seed(0)
    cfg = llama_config(len(tok), 32, 2, 4, 2, 64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg.tie_word_embeddings = os.environ.get("TIED") == "1"  # untied: the common case
    teacher = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(6.0)  # a few nats of spread: the top-16 mass is well below 1
    teacher.save_pretrained(work / "teacher")
    tok.save_pretrained(work / "teacher")
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(llama_config(len(tok), 16, 2, 2, 1, 32)).save_pretrained(work / "student")
    tok.save_pretrained(work / "student")
    return {"corpus": str(work / "corpus"), "teacher": str(work / "teacher"), "student": str(work / "student"),
            "vocab": len(tok)}


def stage(args: list[str], log: Path) -> tuple[int, str]:
    """Run ``python -m <stage> ...`` (one thread); returns (exit code, its output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=ROOT)
    log.write_text(res.stdout + res.stderr)
    return res.returncode, res.stdout + res.stderr


def precompute(a: dict, work: Path, t_c: float, k: int) -> Path:
    out = work / f"cache-t{t_c}-k{k}"
    cfg = {"teachers": [{"path": a["teacher"]}],
           "dataset": {"path": a["corpus"], "split": "train", "id_field": "id", "max_length": 48, "num_samples": 8},
           "cache": {"dir": str(out), "k": k, "value_dtype": "float32"}, "batch_size": 4, "temperature": t_c,
           "device": "cpu", "teacher_check": "warn"}  # a random teacher: its perplexity on text is ~V
    (work / f"{out.name}.yaml").write_text(yaml.safe_dump(cfg))
    code, text = stage(["stages.precompute_teacher", "--config", str(work / f"{out.name}.yaml")], work / f"{out.name}.log")
    if code != 0:
        sys.exit(f"precompute-teacher failed for T_c={t_c} k={k}:\n{text[-2000:]}")
    return out


def train(a: dict, work: Path, cache: Path, tau: float, tail: str) -> tuple[int, str, Path]:
    out = work / f"run-{cache.name}-tau{tau}-{tail}"
    cfg = {"output_dir": str(out), "student": {"path": a["student"], "init": "pretrained"},
           "data": {"train_cache": str(cache)}, "loss": {"alpha": 0.0, "temperature": tau, "tail": tail},
           "micro_batch_size": 8, "grad_accum_steps": 1, "max_steps": 1, "log_steps": 1, "device": "cpu",
           "optim": {"warmup_steps": 0}}
    (work / f"{out.name}.yaml").write_text(yaml.safe_dump(cfg))
    code, text = stage(["stages.train_student", "--config", str(work / f"{out.name}.yaml")], work / f"{out.name}.log")
    return code, text, out


@functools.lru_cache(maxsize=None)
def float64_model(path: str):
    """The saved model at ``path`` in float64, eval mode (loaded once)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


@torch.no_grad()
def reference_kl(a: dict, cache: Path, tau: float, k: int, tail: str) -> dict[str, float]:
    """Per-sample float64 KL from the teacher's and the student's own logits."""
    from pipeline.cache import open_cache

    teacher, student = float64_model(a["teacher"]), float64_model(a["student"])
    reader = open_cache(str(cache))
    out = {}
    for rec in reader:  # every record, in storage order
        ids = torch.from_numpy(np.asarray(rec.input_ids, dtype=np.int64))[None]
        zt, zs = teacher(input_ids=ids).logits[0, :-1], student(input_ids=ids).logits[0, :-1]
        valid = torch.from_numpy(np.asarray(rec.loss_mask[1:], dtype=bool))
        p, log_q = torch.softmax(zt[valid] / tau, -1), torch.log_softmax(zs[valid] / tau, -1)
        S = torch.topk(zt[valid], k, -1).indices
        pS, log_qS = p.gather(-1, S), log_q.gather(-1, S)
        if tail == "renormalize":
            pn = pS / pS.sum(-1, keepdim=True)
            kl = (pn * (pn.log() - log_qS)).sum(-1)
        else:
            kl = (pS * (pS.log() - log_qS)).sum(-1)
            pt, qt = (1 - pS.sum(-1)).clamp(min=0), (1 - log_qS.exp().sum(-1))
            kl = kl + torch.where(pt > 1e-12, pt * (pt.clamp(min=1e-300).log() - qt.clamp(min=1e-300).log()), 0.0)
        out[rec.sample_id] = float(kl.sum())
    return out


def logged_kl(run: Path) -> dict[str, float]:
    """Step-1 ``kl_sum`` per sample from the run's loss logs."""
    from pipeline.losslog.reader import load_loss_logs

    t = load_loss_logs(run, split="train").to_pandas()
    t = t[t["step"] == t["step"].min()]
    return dict(zip(t["sample_id"], t["kl_sum"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--jobs", type=int, default=2, help="train-student runs side by side")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="temperature-check-"))
    work.mkdir(parents=True, exist_ok=True)
    a = build(work)
    V = a["vocab"]
    caches = {(t_c, k): precompute(a, work, t_c, k) for t_c in TEMPS for k in (16, V)}
    cases = [(t_c, k, tau, tail) for (t_c, k) in caches for tau in TEMPS for tail in ("bucket", "renormalize")]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda c: train(a, work, caches[c[:2]], c[2], c[3]), cases))
    failures = 0
    print(f"{'T_c':>4} {'tau':>4} {'k':>4} {'tail':<12} {'expected':<8} {'result':<10} {'max rel err':>12}")
    for (t_c, k, tau, tail), (code, text, run) in zip(cases, runs):
        exact = tail == "renormalize" or t_c == tau or k >= V
        if not exact:
            ok = code != 0 and f"loss.temperature={tau} differs from the cache temperature {t_c}" in text
            failures += not ok
            print(f"{t_c:>4} {tau:>4} {k:>4} {tail:<12} {'refused':<8} {'refused' if ok else 'NOT REFUSED':<10} {'':>12}")
            continue
        if code != 0:
            failures += 1
            print(f"{t_c:>4} {tau:>4} {k:>4} {tail:<12} {'exact':<8} {'FAILED':<10}  {text.strip().splitlines()[-1]}")
            continue
        got, ref = logged_kl(run), reference_kl(a, caches[(t_c, k)], tau, k, tail)
        err = max(abs(got[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in got)
        failures += err > TOL
        print(f"{t_c:>4} {tau:>4} {k:>4} {tail:<12} {'exact':<8} {'ok' if err <= TOL else 'WRONG':<10} {err:>12.2e}")
    print(f"{len(cases) - failures}/{len(cases)} cases as documented (work directory {work})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
