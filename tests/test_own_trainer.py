"""``pipeline.kd``: the cache as a dataset, the fused loss as a module and the Hugging Face
``KDTrainer`` give train-student's numbers, and the examples of docs/guide/own-trainer.md run
as written.

* :class:`KDLoss` against train-student's step 1 (``Trainer.train_step`` with SGD at lr 1, so
  the weight change is minus the gradient), for every divergence and tail mode, and against the
  dense formula written out here on the model's own logits;
* ``KDTrainer`` against a ``train-student`` run of the same schedule: in this process, and on
  2 ranks (this file's :func:`main` under ``torchrun``, gloo: train-student with FSDP2, then
  the Trainer with DDP, in one launch).
"""
from __future__ import annotations

import copy
import json
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.kd import CacheDataset, KDCollator, KDLoss, StepOrderSampler, defer_output_projection

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "guide" / "own-trainer.md"
SEED, LR = 3, 1e-2
STEPS = 4


def _train_student_cfg(assets, caches, out: Path, world_size: int) -> dict:
    """A train-student config whose schedule the Trainer can repeat: AdamW, constant LR, no
    warmup, clipping at 1, weight decay on matrices only (HF's rule too, for a Llama), and the
    ``global`` shuffle (the order :class:`StepOrderSampler` repeats)."""
    return {"output_dir": str(out), "student": {"path": assets["student"]},
            "data": {"train_cache": str(caches["train"]), "shuffle": "global"},
            "micro_batch_size": 2, "grad_accum_steps": 2, "max_steps": STEPS - (world_size - 1), "log_steps": 1,
            "device": "cpu", "seed": SEED, "loss": {"alpha": 0.5, "temperature": 1.0},
            "optim": {"lr": LR, "weight_decay": 0.1, "betas": [0.9, 0.999], "eps": 1e-8, "warmup_steps": 0,
                      "schedule": "constant", "max_grad_norm": 1.0}}


def _short_run(assets, caches, out: Path, steps: int, **args):
    """A KDTrainer of ``steps`` steps (seed SEED, constant LR) on the fixture's train cache;
    ``args``: more ``TrainingArguments``."""
    from transformers import TrainingArguments

    from pipeline.kd import KDTrainer
    from pipeline.models import build_student

    model = build_student(assets["student"], "random", SEED)
    targs = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                              max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", logging_steps=1,
                              seed=SEED, report_to="none", use_cpu=True, disable_tqdm=True,
                              dataloader_pin_memory=False, **args)
    return KDTrainer(model=model, args=targs, train_dataset=CacheDataset(caches["train"]))


def _run_kd_trainer(assets, caches, out: Path, world_size: int):
    """The Hugging Face Trainer on the schedule of :func:`_train_student_cfg` (its own AdamW,
    scheduler, clipping and accumulation); returns the trained trainer."""
    steps = _train_student_cfg(assets, caches, out, world_size)["max_steps"]
    trainer = _short_run(assets, caches, out, steps, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.999,
                         adam_epsilon=1e-8, warmup_steps=0, max_grad_norm=1.0, save_strategy="no",
                         ddp_backend="gloo" if world_size > 1 else None)
    trainer.train()
    return trainer


def _assert_same_run(ts_dir: Path, hf_losses: list[float], hf_state: dict, student: str, tol: float) -> None:
    """The Trainer's per-step losses and final weights equal train-student's (``ts_dir``: its
    metrics.jsonl and final/), and every weight moved from the common initial one."""
    from safetensors.torch import load_file

    from pipeline.models import build_student

    ts_losses = [json.loads(line)["train/loss"] for line in (ts_dir / "metrics.jsonl").read_text().splitlines()
                 if "train/loss" in line]
    assert len(hf_losses) == len(ts_losses) > 0
    np.testing.assert_allclose(hf_losses, ts_losses, rtol=1e-6)
    ref = load_file(str(ts_dir / "final" / "model.safetensors"))
    initial = build_student(student, "random", SEED).state_dict()
    assert ref.keys() <= hf_state.keys()
    for name, w in ref.items():
        assert not torch.equal(w, initial[name]), f"{name} never trained"
        torch.testing.assert_close(hf_state[name], w, rtol=0, atol=tol, msg=name)


# -- the loss module against train-student's step ---------------------------------------------

CASES = [  # (tail, divergence, τ, T_c, α, sampled cache)
    ("bucket", "forward_kl", 1.0, 1.0, 0.5, False),
    ("bucket", "forward_kl", 2.0, 2.0, 0.3, False),
    ("renormalize", "forward_kl", 2.0, 1.0, 0.5, False),
    ("sampled", "forward_kl", 1.0, 1.0, 0.5, True),
    ("bucket", "reverse_kl", 1.0, 1.0, 0.0, False),
    ("bucket", "jsd", 1.0, 1.0, 0.5, False),
    ("bucket", "skew_forward_kl", 1.0, 1.0, 0.5, False),
    ("renormalize", "skew_reverse_kl", 0.5, 1.0, 0.5, False),
    ("bucket", "tvd", 1.0, 1.0, 0.5, False),
    ("renormalize", "akl", 1.0, 1.0, 0.5, False),
    ("bucket", "forward_kl", 1.0, 1.0, 1.0, False),
]


@pytest.mark.parametrize("tail,divergence,tau,t_c,alpha,sampled", CASES)
def test_kd_loss_equals_train_student_step_one(tail, divergence, tau, t_c, alpha, sampled):
    """Two micro-batches of one optimizer step: Σ KDLoss(micro, num_items_in_batch=N) equals
    train-student's step loss, and its gradient equals the step's (SGD at lr 1: minus the
    weight change), for every divergence and tail mode, τ ≠ T_c included."""
    from helpers import synthetic_records, tiny_student

    from pipeline.config import LossConfig
    from pipeline.data.batch import collate
    from pipeline.student.step import Trainer

    V, k = 48, 6
    recs = synthetic_records(6, V, k, seed=4, padded=sampled)
    micro = [recs[:3], recs[3:]]
    model = tiny_student(V, seed=1)
    ours = copy.deepcopy(model)
    cfg = LossConfig(alpha=alpha, temperature=tau, tail=tail, divergence=divergence, beta=0.3, skew=0.2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=1.0), None, cfg, None, torch.device("cpu"),
                      cache_temperature=t_c)
    stats = trainer.train_step([collate(r) for r in micro])

    loss_fn = KDLoss(alpha=alpha, temperature=tau, tail=tail, divergence=divergence, beta=0.3, skew=0.2,
                     cache_temperature=t_c)
    head = defer_output_projection(ours)
    batches = [KDCollator()(r) for r in micro]
    n = sum(b["rows"].numel() for b in batches)
    assert n == stats.n_tokens == sum(r.n_valid for r in recs)
    total = 0.0
    for b in batches:
        hidden = ours(input_ids=b["input_ids"]).logits
        loss = loss_fn(hidden, head.weight, head.bias, b, num_items_in_batch=n)
        loss.backward()
        total += loss.item()
    assert total == pytest.approx(stats.loss, rel=1e-6, abs=1e-7)
    for name, p in ours.named_parameters():
        step = before[name] - dict(model.named_parameters())[name].detach()
        torch.testing.assert_close(p.grad, step, rtol=1e-5, atol=2e-7, msg=name)


def test_kd_loss_equals_the_dense_formula_on_the_models_logits():
    """Forward KL with the tail bucket at τ = T_c = 1, written out on the unmodified model's
    float64 logits: ``(α Σ CE + (1−α) Σ [Σ_S p log(p/q) + p_tail log(p_tail/q_tail)]) / N``."""
    from helpers import synthetic_records, tiny_student

    V, k, alpha = 40, 5, 0.4
    recs = synthetic_records(3, V, k, seed=7)
    model = tiny_student(V, seed=2)
    dense = copy.deepcopy(model).double()
    batch = KDCollator()(recs)
    head = defer_output_projection(model)
    got = KDLoss(alpha=alpha)(model(input_ids=batch["input_ids"]).logits, head.weight, head.bias, batch,
                              num_items_in_batch=7.0)
    total = 0.0
    with torch.no_grad():
        for r in recs:
            logq = torch.log_softmax(dense(input_ids=torch.as_tensor(r.input_ids[None]).long()).logits[0], -1)
            for t in np.flatnonzero(r.loss_mask[1:]):
                ids = torch.as_tensor(r.topk_ids[t]).long()
                p = torch.as_tensor(r.topk_logprobs[t]).double().exp()
                p_tail = float(np.exp(np.float64(r.tail_logprob[t])))
                q_tail = 1 - logq[t, ids].exp().sum()
                kl = (p * (p.log() - logq[t, ids])).sum() + p_tail * (np.log(p_tail) - torch.log(q_tail))
                ce = -logq[t, int(r.input_ids[t + 1])]
                total += float(alpha * ce + (1 - alpha) * kl)
    assert got.item() == pytest.approx(total / 7.0, rel=1e-5)


def test_kd_loss_reads_and_checks_the_cache(caches):
    """The cache temperature, tail mode and V come from the manifest; refused pairs are refused."""
    ds = CacheDataset(caches["train"])
    loss = KDLoss(ds)
    m = ds.manifest
    assert (loss.cache_temperature, loss.tail, loss.vocab_size) == (m.temperature, "bucket", m.vocab_size)
    assert KDLoss(str(caches["train"]), temperature=2.0, tail="renormalize").cache_temperature == m.temperature
    with pytest.raises(ValueError, match="loss.tail=bucket needs the teacher's tail mass"):
        KDLoss(ds, temperature=2.0)  # top-8 of V ids at τ ≠ T_c
    with pytest.raises(ValueError, match="needs a cache with targets.type sampled"):
        KDLoss(ds, tail="sampled")
    with pytest.raises(ValueError, match="loss.divergence must be one of"):
        KDLoss(ds, divergence="kl")


# -- the dataset, the collator and the sampler -------------------------------------------------

def test_dataset_and_collator_give_the_caches_records_and_hf_labels(caches):
    from pipeline.cache import open_cache

    ds = CacheDataset(caches["train"])
    reader = open_cache(caches["train"])
    assert len(ds) == len(reader) == ds.manifest.num_samples
    recs = [ds[i] for i in (0, 5, len(ds) - 1)]
    assert [r.sample_id for r in recs] == [reader[i].sample_id for i in (0, 5, len(ds) - 1)]
    assert pickle.loads(pickle.dumps(ds))[5].sample_id == recs[1].sample_id  # DataLoader workers reopen it
    with pytest.raises(IndexError):
        ds[len(ds)]
    b = KDCollator()(recs)
    L = max(len(r.input_ids) for r in recs)
    assert b["input_ids"].shape == b["labels"].shape == (3, L)
    for i, r in enumerate(recs):
        T = len(r.input_ids)
        want = np.where(np.arange(T) >= 1, np.where(r.loss_mask, r.input_ids, -100), -100)  # target t+1 at t+1
        assert b["labels"][i, :T].tolist() == want.tolist() and (b["labels"][i, T:] == -100).all()
    # the count a Hugging Face causal-LM loss takes (labels[..., 1:] != -100) is the KD loss's N
    assert int((b["labels"][:, 1:] != -100).sum()) == b["rows"].numel() == sum(r.n_valid for r in recs)
    assert b["topk_ids"].shape == (b["rows"].numel(), ds.manifest.k) and b["sample_ids"] == [r.sample_id for r in recs]


def test_step_order_sampler_epochs_and_whole_global_batches():
    s = StepOrderSampler(23, micro_batch_size=2, grad_accum_steps=2, world_size=2, seed=5)
    first = list(s)
    assert len(first) == len(s) == 16  # 2 global batches of 8; the epoch's tail is dropped
    assert first == np.random.default_rng([5, 0]).permutation(23)[:16].tolist()
    s.set_epoch(1)
    assert list(s) == np.random.default_rng([5, 1]).permutation(23)[:16].tolist()


# -- the Hugging Face Trainer against train-student ----------------------------------------------

def test_kd_trainer_matches_train_student_one_process(assets, caches, tmp_path):
    """4 optimizer steps of 2 micro-batches of 2 samples: the same per-step losses and final weights."""
    from tests.conftest import run_cli, write_yaml

    cfg = write_yaml(tmp_path / "ts.yaml", _train_student_cfg(assets, caches, tmp_path / "ts", 1))
    res = run_cli(["stages.train_student", "--config", str(cfg)])
    assert res.returncode == 0, res.stderr[-3000:]
    trainer = _run_kd_trainer(assets, caches, tmp_path / "hf", 1)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    _assert_same_run(tmp_path / "ts", losses, trainer.model.state_dict(), assets["student"], tol=1e-6)


def test_kd_trainer_matches_train_student_two_processes(assets, caches, tmp_path):
    """2 ranks (torchrun, gloo): train-student (FSDP2) and the Trainer (DDP) over the same 3
    steps of a global batch of 8 give the same losses and weights."""
    from tests.conftest import run_cli

    (tmp_path / "args.json").write_text(json.dumps({"assets": {k: str(v) for k, v in assets.items()},
                                                    "caches": {k: str(v) for k, v in caches.items()}}))
    res = run_cli(["tests.test_own_trainer", str(tmp_path)], nproc=2, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    hf = torch.load(tmp_path / "hf_state.pt")
    _assert_same_run(tmp_path / "ts", json.loads((tmp_path / "hf_losses.json").read_text()), hf,
                     assets["student"], tol=2e-6)


def test_kd_trainer_resumes_exactly_and_runs_in_bf16(assets, caches, tmp_path):
    """The Trainer's own checkpoints (written with the deferred output layer) resume to the
    weights of an uninterrupted run; ``bf16=True`` (the Trainer's autocast around the forward
    pass, the loss in float32) trains to losses within bf16 rounding of float32's."""
    whole = _short_run(assets, caches, tmp_path / "a", 4, save_strategy="steps", save_steps=2)
    whole.train()
    resumed = _short_run(assets, caches, tmp_path / "a", 4, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    bf16 = _short_run(assets, caches, tmp_path / "bf16", 4, save_strategy="no", bf16=True)
    bf16.train()
    fp32 = [h["loss"] for h in whole.state.log_history if "loss" in h]
    np.testing.assert_allclose([h["loss"] for h in bf16.state.log_history if "loss" in h], fp32, rtol=1e-2)


def main(argv: list[str] | None = None) -> int:
    """Under torchrun: train-student's run, then the KDTrainer's, in the same process group;
    rank 0 writes the Trainer's losses and weights to ``OUT`` (``argv[0]``)."""
    from pipeline.config import TrainStudentConfig
    from pipeline.distributed import finish, init_distributed
    from pipeline.student.loop import run

    out = Path((argv if argv is not None else sys.argv[1:])[0])
    spec = json.loads((out / "args.json").read_text())
    info = init_distributed("cpu")
    run(TrainStudentConfig(**_train_student_cfg(spec["assets"], spec["caches"], out / "ts", info.world_size)), info)
    trainer = _run_kd_trainer(spec["assets"], spec["caches"], out / "hf", info.world_size)
    assert trainer.accelerator.num_processes == info.world_size
    if info.rank == 0:
        torch.save(trainer.model.state_dict(), out / "hf_state.pt")
        (out / "hf_losses.json").write_text(json.dumps([h["loss"] for h in trainer.state.log_history if "loss" in h]))
    return finish(0)


# -- the documentation's examples, as written ---------------------------------------------------

def _doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_docs_examples_run_as_written(assets, caches, tmp_path, monkeypatch):
    """Both code blocks of docs/guide/own-trainer.md, executed unchanged from a directory whose
    ``runs/my/`` holds the fixture's caches and a student: the plain loop (≤ 25 lines) trains
    and saves a student that loads as a plain causal LM; the Trainer example trains, evaluates
    and saves a directory that loads with the trained weights."""
    from transformers import AutoModelForCausalLM

    from pipeline.models import build_student

    plain, hf = _doc_blocks()
    assert len(plain.splitlines()) <= 25
    my = tmp_path / "runs" / "my"
    my.mkdir(parents=True)
    (my / "cache-train").symlink_to(caches["train"])
    (my / "cache-eval").symlink_to(caches["validation"])
    student = build_student(assets["student"], "random", 0)
    student.save_pretrained(my / "student")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    torch.manual_seed(0)

    env: dict = {"__name__": "__main__"}
    exec(compile(plain, f"{DOC}[plain loop]", "exec"), env)
    trained = AutoModelForCausalLM.from_pretrained(my / "student-kd")
    ids = torch.tensor([[1, 5, 9, 2]])
    logits = trained(input_ids=ids).logits
    assert logits.shape == (1, 4, assets["vocab"])  # a plain causal LM again
    torch.testing.assert_close(logits, env["model"](input_ids=ids).logits)
    assert not torch.equal(trained.model.embed_tokens.weight, student.model.embed_tokens.weight)

    env = {"__name__": "__main__"}
    exec(compile(hf, f"{DOC}[Trainer]", "exec"), env)
    assert env["trainer"].state.global_step == 10
    assert (my / "hf-kd" / "checkpoint-5").is_dir() and (my / "hf-kd" / "checkpoint-10").is_dir()
    saved = AutoModelForCausalLM.from_pretrained(my / "hf-kd" / "final").state_dict()
    for name, w in env["model"].state_dict().items():
        torch.testing.assert_close(saved[name], w, rtol=0, atol=0, msg=name)
    assert np.isfinite(env["trainer"].evaluate()["eval_loss"])


if __name__ == "__main__":
    sys.exit(main())
