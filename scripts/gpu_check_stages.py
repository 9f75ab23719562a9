"""Both stages end to end on one device, checked against float32 references (used by
``scripts/gpu_check.py``).

A tiny untied Llama teacher (its own ``lm_head``, as most real teachers; hidden 64, 2 layers, its final norm scaled ×6, which scales its
logits ×6, so that the top-16 holds most of the mass) and a tiny student (hidden 32, 2 layers) are built from configs
over the standard-library corpus and a BPE tokenizer of 320 tokens trained on it (nothing is
downloaded). ``precompute-teacher`` (k = 16, float32 cache values, so the codec adds nothing)
and ``train-student`` (α = 0.5, forward KL, ``tail: bucket``, 2 micro-batches of 4 samples per
step, evaluation at the last step, the given ``mixed_precision``) run through their console
entry points (``stages.*.main``) in this process, at world size 1, on the device. Then:

* **cache**: every cached position against ``log_softmax(teacher(input_ids).logits)`` of the
  saved float32 teacher, computed here in float32 on the CPU: the largest error of a cached
  value; every cached id is in the reference top-k up to the tolerance (its reference
  log-probability ≥ the k-th largest − tolerance); the tail mass ``exp(tail_logprob)`` against
  ``1 − Σ`` of the reference probabilities of the cached ids.
* **step 1**: the loss log's per-sample ``ce_sum`` / ``kl_sum`` of the first optimizer step and
  ``train/loss`` of ``metrics.jsonl`` against the same sums from the saved (initial) student's
  float32 logits on the CPU and the cached targets: ``CE_t = logsumexp(z_t) − z_t[y_t]``,
  ``KL_t = Σ_S p (log p − log q) + p_tail (log p_tail − log q_tail)`` with ``(p_S, p_tail)``
  the cached values and tail normalised together and ``q = softmax(z_t)`` (DESIGN.md, Loss).

Tolerance (:func:`tolerance`), in nats, on a cached log-probability, a tail mass and a
per-token loss (a per-sample sum divided by its tokens, the step loss): in float32 only the
order of summation differs, 1e-4 (~100× float32's rounding of a few-nat value). In bf16, with
unit roundoff u = 2⁻⁸ ≈ 3.9e-3, a logit ``z`` is rounded by up to u·|z| where it is formed and
inherits a few such roundings from the hidden states it is made of; a log-softmax value or a
CE/KL term moves by about the logits' own errors: 4·u·max|z| over the reference logits of the
positions checked. (A bf16 copy of this teacher on the CPU gives a largest cached-value error
of 1.2·u·max|z|.) A wrong normalisation, a missing term, another sample's targets or a wrong
temperature are off by far more.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
import yaml

K = 16
MICRO_BATCH, GRAD_ACCUM, STEPS, EVAL_SAMPLES = 4, 2, 3, 8
"""train-student's micro-batch size, accumulation, steps and evaluated samples (one evaluation, at the last step)."""
U_BF16 = 2.0**-8
"""bf16's unit roundoff (8 significant bits)."""


def tolerance(dtype: torch.dtype, zmax: float) -> float:
    """Largest error allowed (nats) on a log-probability or a per-token loss computed in
    ``dtype`` from logits of magnitude up to ``zmax``: 1e-4 in float32, ``4 · u · zmax`` in bf16
    (module docstring)."""
    return 1e-4 if dtype == torch.float32 else 4 * U_BF16 * zmax


def build(work: Path) -> dict:
    """Corpus, tokenizer, the saved teacher and (initial) student; their paths and V."""
    from transformers import AutoModelForCausalLM

    from pipeline.data.demo_corpus import build_corpus, llama_config, train_tokenizer

    dd = build_corpus(work / "corpus", max_chars=300, heldout_fraction=0.2, limit_files=12)
    tok = train_tokenizer(dd["train"]["text"][:], 320, work / "tokenizer")
    shapes = {"teacher": (64, 2, 4, 2, 128), "student": (32, 2, 2, 1, 64)}  # hidden, layers, heads, kv heads, ffn
    for seed, role in enumerate(shapes):
        torch.manual_seed(seed)
        cfg = llama_config(len(tok), *shapes[role], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        cfg.tie_word_embeddings = role == "student"  # the teacher's output layer is its own (untied)
        model = AutoModelForCausalLM.from_config(cfg)
        if role == "teacher":  # logits × 6: a peaked teacher, the top-k and the tail both matter
            with torch.no_grad():
                model.model.norm.weight.mul_(6.0)
        for saved in (model, tok):
            saved.save_pretrained(work / role)
    return {"corpus": str(work / "corpus"), "teacher": str(work / "teacher"), "student": str(work / "student"),
            "vocab": len(tok)}


def run_stage(module: str, cfg: dict, work: Path, name: str) -> None:
    """``python -m <module> --config <name>.yaml`` as an in-process call of its ``main``; its
    output goes to ``<name>.log``.

    Raises:
        RuntimeError: a non-zero exit code (with the log's tail).
    """
    import importlib

    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = importlib.import_module(module).main(["--config", str(path)])
    (work / f"{name}.log").write_text(out.getvalue())
    if code:
        raise RuntimeError(f"{module} exited {code}:\n{out.getvalue()[-3000:]}")


def run_stages(a: dict, work: Path, device: str, mixed_precision: str) -> dict:
    """precompute-teacher, then train-student (3 steps); the cache and run directories, and
    train-student's ``Batch.to`` counts (:func:`watch_batch_moves`) with the expected count."""
    from pipeline.config import PrecomputeConfig

    cache, run = work / "cache", work / "run"
    pre = {"teachers": [{"path": a["teacher"]}], "batch_size": 4, "device": device,
           "dataset": {"path": a["corpus"], "split": "train", "id_field": "id", "max_length": 64, "num_samples": 32},
           "cache": {"dir": str(cache), "k": K, "value_dtype": "float32", "samples_per_shard": 16, "row_group_size": 4}}
    if "teacher_check" in PrecomputeConfig.model_fields:  # a random teacher's perplexity is ~V: not a broken load
        pre["teacher_check"] = "warn"
    run_stage("stages.precompute_teacher", pre, work, "precompute")
    with watch_batch_moves() as moves:
        run_stage("stages.train_student", {
            "output_dir": str(run), "student": {"path": a["student"], "init": "pretrained"},
            "data": {"train_cache": str(cache), "eval_cache": str(cache), "eval_max_samples": EVAL_SAMPLES},
            "loss": {"alpha": 0.5, "tail": "bucket"}, "micro_batch_size": MICRO_BATCH, "grad_accum_steps": GRAD_ACCUM,
            "max_steps": STEPS, "eval_steps": STEPS, "log_steps": 1, "device": device, "mixed_precision": mixed_precision,
            "optim": {"warmup_steps": 0}, "wandb": {"mode": "disabled"},
        }, work, "train")
    return {"cache": cache, "run": run, "moves": moves, "expected_moves": expected_moves(run)}


def _float32_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def check_cache(a: dict, cache: Path) -> dict:
    """Every cached position against the float32 teacher's own log-softmax (module docstring).

    Returns:
        ``value_err`` (largest |cached − reference| log-probability, nats), ``id_margin`` (the
        smallest reference log-probability of a cached id minus the reference k-th largest:
        ≥ 0 when the ids are the exact top-k), ``topk_exact`` (fraction of positions whose
        id set is the reference top-k), ``tail_err`` (largest tail-mass error), ``zmax``
        (largest |reference logit|), ``positions``.
    """
    from pipeline.cache import open_cache

    teacher = _float32_model(a["teacher"])
    value_err = tail_err = zmax = 0.0
    margin, exact, n = float("inf"), 0, 0
    for rec in open_cache(str(cache)):
        ids = torch.from_numpy(np.asarray(rec.input_ids, dtype=np.int64))[None]
        z = teacher(input_ids=ids).logits[0, :-1].float()  # (P, V)
        zmax = max(zmax, float(z.abs().max()))
        ref = torch.log_softmax(z, -1)
        c_ids = torch.from_numpy(np.asarray(rec.topk_ids, dtype=np.int64))  # (P, k)
        c_val = torch.from_numpy(np.asarray(rec.topk_logprobs, dtype=np.float32))
        c_tail = torch.from_numpy(np.asarray(rec.tail_logprob, dtype=np.float32))
        at = ref.gather(1, c_ids)  # (P, k) reference log-probabilities of the cached ids
        top = ref.topk(c_ids.shape[1], -1)
        value_err = max(value_err, float((c_val - at).abs().max()))
        margin = min(margin, float((at.min(-1).values - top.values[:, -1]).min()))
        exact += int((c_ids.sort(-1).values == top.indices.sort(-1).values).all(-1).sum())
        tail_err = max(tail_err, float((c_tail.exp() - (1 - at.exp().sum(-1))).abs().max()))
        n += len(c_ids)
    return {"value_err": value_err, "id_margin": margin, "topk_exact": exact / n, "tail_err": tail_err,
            "zmax": zmax, "positions": n}


@torch.no_grad()
def check_step1(a: dict, cache: Path, run: Path, alpha: float = 0.5) -> dict:
    """The first step's logged per-sample sums and ``train/loss`` against the float32 reference.

    Returns:
        ``ce_err`` / ``kl_err`` (largest per-sample error per token, nats), ``loss_err`` (of
        the step loss, per token), ``tokens_equal`` (every logged ``n_tokens`` equals the
        valid positions), ``loss`` (logged) and ``ref_loss``, ``zmax`` (largest |reference
        student logit|), ``samples``.
    """
    from pipeline.cache import open_cache
    from pipeline.losslog.reader import load_loss_logs

    log = load_loss_logs(run, split="train").to_pandas()
    first = log[log["step"] == log["step"].min()]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    logged_loss = next(m["train/loss"] for m in metrics if "train/loss" in m and m["step"] == int(first["step"].iloc[0]))
    student, reader = _float32_model(a["student"]), open_cache(str(cache))
    ce_err = kl_err = zmax = 0.0
    tokens_equal, total, n_total = True, 0.0, 0
    for sid, ce_log, kl_log, n_log in zip(first["sample_id"], first["ce_sum"], first["kl_sum"], first["n_tokens"]):
        rec = reader[reader.index_of(sid)]
        valid = torch.from_numpy(np.asarray(rec.loss_mask[1:], dtype=bool))
        ids = torch.from_numpy(np.asarray(rec.input_ids, dtype=np.int64))
        z = student(input_ids=ids[None]).logits[0, :-1][valid].float()  # (n, V)
        zmax = max(zmax, float(z.abs().max()))
        log_q = torch.log_softmax(z, -1)
        ce = -log_q.gather(1, ids[1:][valid, None]).squeeze(1)
        lp = torch.from_numpy(np.asarray(rec.topk_logprobs, dtype=np.float32))[valid]
        tail = torch.from_numpy(np.asarray(rec.tail_logprob, dtype=np.float32))[valid]
        norm = torch.logsumexp(torch.cat([lp, tail[:, None]], -1), -1)  # cached values + tail, normalised together
        log_p, log_pt = lp - norm[:, None], tail - norm
        log_qS = log_q.gather(1, torch.from_numpy(np.asarray(rec.topk_ids, dtype=np.int64))[valid])
        log_qt = torch.log((1 - log_qS.exp().sum(-1)).clamp(min=1e-30))
        kl = (log_p.exp() * (log_p - log_qS)).sum(-1) + log_pt.exp() * (log_pt - log_qt)
        n = max(int(valid.sum()), 1)
        ce_err = max(ce_err, abs(ce_log - float(ce.sum())) / n)
        kl_err = max(kl_err, abs(kl_log - float(kl.sum())) / n)
        tokens_equal &= int(n_log) == int(valid.sum())
        total += alpha * float(ce.sum()) + (1 - alpha) * float(kl.sum())
        n_total += int(valid.sum())
    ref_loss = total / n_total
    return {"ce_err": ce_err, "kl_err": kl_err, "loss_err": abs(logged_loss - ref_loss), "tokens_equal": tokens_equal,
            "loss": logged_loss, "ref_loss": ref_loss, "zmax": zmax, "samples": len(first)}


@contextlib.contextmanager
def watch_batch_moves():
    """Count, while the block runs, every ``Batch.to`` call: ``moved`` (calls), ``pinned``
    (of them, batches whose tensors were pinned), ``again`` (batches already off the host:
    a second placement). Patches ``pipeline.data.batch.Batch.to`` and restores it."""
    from pipeline.data.batch import Batch

    original, stats = Batch.to, {"moved": 0, "pinned": 0, "again": 0}

    def to(self, device):
        stats["moved"] += 1
        stats["pinned"] += bool(self.input_ids.is_pinned())
        stats["again"] += self.input_ids.device.type != "cpu"
        return original(self, device)

    Batch.to = to
    try:
        yield stats
    finally:
        Batch.to = original


def expected_moves(run: Path) -> int:
    """The micro-batches train-student ran (train steps × accumulation + evaluations × eval
    batches), the steps and evaluations read from its loss logs: each should have been moved
    to the device once."""
    from pipeline.losslog.reader import load_loss_logs

    steps = load_loss_logs(run).to_pandas().groupby("split")["step"].nunique()
    eval_batches = -(-EVAL_SAMPLES // MICRO_BATCH)
    return int(steps.get("train", 0)) * GRAD_ACCUM + int(steps.get("eval", 0)) * eval_batches
