"""Every common architecture in both roles, loaded by both loaders, checked against the model's
own ``forward().logits`` in float64 (tests/arch_models.py):

- **teacher**: the cache ``precompute-teacher`` writes (row-sharded loader, FSDP2; 1 rank in this
  process, 2 ranks in one ``torchrun`` for all models) holds, at every position, the model's own
  log-probabilities at the cached ids, the true top-k, and the tail mass — for a tied and an
  untied output layer, saved as one safetensors file and as several; the whole-model load
  (``from_pretrained``) is switched off, so a checkpoint that is not read row by row fails.
- **student** (random and pretrained init, 1 and 2 ranks, CE only): the step-1 ``ce_sum`` of
  every sample equals the model's own cross-entropy before the step; the final evaluation's
  equals that of ``final/`` reloaded with ``from_pretrained``, which is not the initial model.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, precompute_config, run_cli, write_yaml

from arch_models import ce_sum64, logprobs64, present, save_model, zero_output_layer

ARCH = present()
K = 32
TOL = 2e-5  # nats: float32 cache values and sums against float64 references
SEED = 0


SLOW = pytest.mark.slow_arch


CORE = {"llama", "qwen3_moe", "gpt_neox", "gemma2"}
"""The architectures ``make test`` runs at 2 ranks: a plain untied head, stacked experts read
per rank, a renamed head, a soft-capped head (the others at 2 ranks in the CI's slow_arch run)."""


def _cases(second: tuple, default, archs=None) -> list:
    """``(arch, tie, x)`` for every present architecture, tied and untied, and every ``x`` of
    ``second``; cases where ``x != default(tie)``, or whose architecture is not in ``archs``
    (given), are ``slow_arch`` (``make test`` runs one ``x`` per architecture and tie, the CI
    all of them)."""
    return [pytest.param(a, tie, x, id=f"{a}-{'tied' if tie else 'untied'}-{x}",
                         marks=[] if x == default(tie) and (archs is None or a in archs) else [SLOW])
            for a in ARCH for tie in (True, False) for x in second]


# (arch, tie, files): by default each tie and file layout at one rank count or the other
TEACHERS_1 = _cases(("one", "multi"), lambda tie: "one" if tie else "multi")
TEACHERS_2 = _cases(("one", "multi"), lambda tie: "multi" if tie else "one", CORE)
# (arch, tie, init): by default the pretrained student at 2 ranks (the row-sharded loader), the
# random one at 1 rank
STUDENTS_1 = _cases(("random", "pretrained"), lambda tie: "random")
STUDENTS_2 = _cases(("random", "pretrained"), lambda tie: "pretrained", CORE)


def _selected(request, test: str) -> list[str]:
    """The ids of the cases of ``test`` this session runs (after ``-m``/``-k`` deselection; the
    same list in every xdist worker)."""
    return sorted(i.callspec.id for i in request.session.items if getattr(i, "originalname", "") == test)


def _shared(tmp_path_factory, name: str, produce) -> dict:
    """``produce(dir)`` once per test session whatever the number of xdist workers (the first
    worker to get here runs it under a file lock, the others read its JSON result)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of this session
    d, done = root / f"arch-{name}", root / f"arch-{name}.json"
    with FileLock(str(root / f"arch-{name}.lock")):
        if not done.is_file():
            d.mkdir(exist_ok=True)
            done.write_text(json.dumps(produce(d)))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def arch_dirs(assets, tmp_path_factory) -> dict:
    """Every architecture tied and untied, saved one-file and multi-file (``{dir}/{arch}-{tie}/
    {one,multi}``), an untied Llama with an all-zero output layer (``zero-head``), and a small
    CE cache (8 samples) for the students."""
    def produce(d: Path) -> dict:
        for arch in ARCH:
            for tie in (True, False):
                save_model(arch, assets["vocab"], tie, d / f"{arch}-{tie}")
        zero_output_layer(d / "llama-False" / "one", d / "zero-head")
        cfg = precompute_config(assets, d / "cache", **{"dataset.num_samples": 8, "dataset.max_length": 16})
        res = run_cli(["stages.precompute_teacher", "--config", str(write_yaml(d / "cache.yaml", cfg))])
        assert res.returncode == 0, res.stderr[-3000:]
        return {"dir": str(d), "cache": str(d / "cache")}

    return _shared(tmp_path_factory, "models", produce)


def _model_dir(dirs: dict, arch: str, tie: bool, files: str = "multi") -> Path:
    return Path(dirs["dir"]) / f"{arch}-{tie}" / files


def _teacher_config(assets, dirs, arch, tie, files, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg = precompute_config(assets, out / "cache", **{"dataset.num_samples": 8, "dataset.max_length": 16,
                                                      "cache.k": K, "cache.value_dtype": "float32"})
    cfg["teachers"], cfg["tokenizer"] = [{"path": str(_model_dir(dirs, arch, tie, files))}], assets["tokenizer"]
    return write_yaml(out / "pre.yaml", cfg)


def _student_config(dirs, arch, tie, init, out: Path, path: Path | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg = {"output_dir": str(out / "run"), "student": {"path": str(path or _model_dir(dirs, arch, tie)), "init": init},
           "data": {"train_cache": dirs["cache"], "eval_cache": dirs["cache"]}, "loss": {"alpha": 1.0},
           "micro_batch_size": 2, "grad_accum_steps": 1, "max_steps": 1, "eval_steps": 1, "log_steps": 1,
           "device": "cpu", "seed": SEED, "optim": {"warmup_steps": 0, "lr": 1e-2}}
    return write_yaml(out / "train.yaml", cfg)


def _torchrun_jobs(d: Path, jobs: list[dict]) -> dict:
    """All ``jobs`` in one 2-rank ``torchrun`` of tests/arch_runner.py; config path → error."""
    import subprocess

    (d / "jobs.json").write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "tests" / "arch_runner.py"), str(d / "jobs.json"), str(d / "out.json")],
                         capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return {r["config"]: r["error"] for r in json.loads((d / "out.json").read_text())}


def _two_rank_runs(request, tmp_path_factory, test: str, cases: list, stage: str, config, extra=None) -> dict:
    """The selected ``cases`` of ``test`` (``config(*case, dir)`` writes a case's config in
    ``dir``) and the ``extra`` jobs (id → a function of ``dir`` writing its config) run in one
    2-rank ``torchrun`` (once per session); id → ``{"dir", "error": None or the error}``."""
    selected = _selected(request, test)
    jobs = {p.id: (lambda out, v=p.values: config(*v, out)) for p in cases if p.id in selected} | (extra or {})

    def produce(d: Path) -> dict:
        cfgs = {case: write(d / case) for case, write in jobs.items()}
        errors = _torchrun_jobs(d, [{"stage": stage, "config": str(c)} for c in cfgs.values()])
        return {case: {"dir": str(c.parent), "error": errors[str(c)]} for case, c in cfgs.items()}

    key = hashlib.sha256(" ".join(selected).encode()).hexdigest()[:8]  # -k/-m choose other cases
    return _shared(tmp_path_factory, f"{test}-{key}", produce)


@pytest.fixture(scope="session")
def two_rank_teachers(request, assets, arch_dirs, tmp_path_factory) -> dict:
    return _two_rank_runs(request, tmp_path_factory, "test_teacher_two_ranks", TEACHERS_2, "precompute",
                          lambda *case: _teacher_config(assets, arch_dirs, *case))


@pytest.fixture(scope="session")
def two_rank_students(request, arch_dirs, tmp_path_factory) -> dict:
    zero = Path(arch_dirs["dir"]) / "zero-head"  # and a pretrained student with an all-zero output layer
    return _two_rank_runs(request, tmp_path_factory, "test_student_two_ranks", STUDENTS_2, "train",
                          lambda *case: _student_config(arch_dirs, *case),
                          extra={"zero-head": lambda out: _student_config(arch_dirs, "llama", False, "pretrained", out,
                                                                          path=zero)})


def _check_cache(cache: Path, teacher: Path) -> None:
    """Every cached position against the teacher's own float64 log-probabilities: the values at
    the cached ids, distinct ids, none left out above the smallest kept, the tail mass."""
    from transformers import AutoModelForCausalLM

    from pipeline.cache import open_cache

    reader = open_cache(cache)
    assert len(reader) == 8
    model = AutoModelForCausalLM.from_pretrained(teacher)
    for sid in reader.sample_ids:
        rec = reader[reader.index_of(sid)]
        lp = logprobs64(model, rec.input_ids)[:-1]  # (T-1, V)
        ids = rec.topk_ids.astype(np.int64)
        want = np.take_along_axis(lp, ids, -1)
        np.testing.assert_allclose(rec.topk_logprobs, want, rtol=0, atol=TOL, err_msg=sid)
        assert all(len(set(row)) == K for row in ids.tolist()), sid
        kth = -np.sort(-lp, axis=-1)[:, K - 1]  # the k-th largest log-probability per position
        assert (rec.topk_logprobs.min(-1) >= kth - TOL).all(), sid
        np.testing.assert_allclose(rec.tail_logprob, np.log1p(-np.exp(want).sum(-1)), rtol=0, atol=1e-4, err_msg=sid)


def _refuse_whole_load(p, what, dtype):
    raise AssertionError(f"{what} {p}: whole-model load (from_pretrained) in the sharded loader")


@pytest.mark.parametrize("arch,tie,files", TEACHERS_1)
def test_teacher_one_rank(assets, arch_dirs, arch, tie, files, tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.models.sharded.from_pretrained", _refuse_whole_load)
    res = run_cli(["stages.precompute_teacher", "--config", str(_teacher_config(assets, arch_dirs, arch, tie, files,
                                                                                  tmp_path))])
    assert res.returncode == 0, res.stderr[-3000:]
    _check_cache(tmp_path / "cache", _model_dir(arch_dirs, arch, tie, files))


@pytest.mark.parametrize("arch,tie,files", TEACHERS_2)
def test_teacher_two_ranks(arch_dirs, two_rank_teachers, arch, tie, files, request):
    case = two_rank_teachers[request.node.callspec.id]
    assert case["error"] is None, case["error"]
    _check_cache(Path(case["dir"]) / "cache", _model_dir(arch_dirs, arch, tie, files))


def _initial_student(dirs: dict, arch: str, tie: bool, init: str):
    """The student before step 1: the saved model, or the config's weights drawn with the run's
    seed (as every rank draws them)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = _model_dir(dirs, arch, tie)
    if init == "pretrained":
        return AutoModelForCausalLM.from_pretrained(d)
    torch.manual_seed(SEED)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d), dtype=torch.float32)


def _check_student(run: Path, cache: str, initial) -> None:
    """Step 1's per-sample ``ce_sum`` = ``initial``'s own cross-entropy; the final evaluation's
    = that of ``final/`` reloaded, which moved away from ``initial``."""
    from transformers import AutoModelForCausalLM

    from pipeline.cache import open_cache
    from pipeline.losslog.reader import load_loss_logs

    reader = open_cache(cache)
    logs = load_loss_logs(run).to_pandas()
    final = AutoModelForCausalLM.from_pretrained(run / "final")
    train = logs[(logs["split"] == "train") & (logs["step"] == 1)]
    evals = logs[logs["split"] == "eval"]
    assert len(train) and len(evals)
    moved = 0.0
    for rows, model in ((train, initial), (evals, final)):
        for row in rows.itertuples():
            rec = reader[reader.index_of(row.sample_id)]
            want, n = ce_sum64(model, rec.input_ids, rec.loss_mask)
            assert row.n_tokens == n, row.sample_id
            np.testing.assert_allclose(row.ce_sum, want, rtol=1e-5, atol=TOL, err_msg=f"{row.split} {row.sample_id}")
            if model is final:
                moved = max(moved, abs(want - ce_sum64(initial, rec.input_ids, rec.loss_mask)[0]))
    assert moved > 1e-3, "final/ equals the initial student: the step changed nothing"


@pytest.mark.parametrize("arch,tie,init", STUDENTS_1)
def test_student_one_rank(arch_dirs, arch, tie, init, tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.models.sharded.from_pretrained", _refuse_whole_load)
    res = run_cli(["stages.train_student", "--config", str(_student_config(arch_dirs, arch, tie, init, tmp_path))])
    assert res.returncode == 0, res.stderr[-3000:]
    _check_student(tmp_path / "run", arch_dirs["cache"], _initial_student(arch_dirs, arch, tie, init))


@pytest.mark.parametrize("arch,tie,init", STUDENTS_2)
def test_student_two_ranks(arch_dirs, two_rank_students, arch, tie, init, request):
    case = two_rank_students[request.node.callspec.id]
    assert case["error"] is None, case["error"]
    _check_student(Path(case["dir"]) / "run", arch_dirs["cache"], _initial_student(arch_dirs, arch, tie, init))


def test_zero_output_layer_student_refused_at_two_ranks(assets, arch_dirs, two_rank_students):
    """Each rank counts the non-zeros of its rows of the output layer; all ranks refuse together."""
    error = two_rank_students["zero-head"]["error"]
    assert error and error.startswith(f"ValueError: student {Path(arch_dirs['dir']) / 'zero-head'}: its output layer "
                                      f"({assets['vocab']}, 32) is all zeros"), error
