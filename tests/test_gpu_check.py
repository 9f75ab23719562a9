"""scripts/gpu_check.py's CPU branch end to end (so the GPU check cannot rot), that its checks
fail on wrong numbers, and the CUDA-only loader/TF32 details as the CPU sees them: no-ops."""
from __future__ import annotations

import json
import sys
import threading

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """One ``gpu_check.py --device cpu`` run in this process (one torch thread): exit code,
    its JSON, its work directory."""
    import gpu_check

    d = tmp_path_factory.mktemp("gpu-check")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = gpu_check.main(["--device", "cpu", "--out", str(d / "summary.json"), "--work", str(d / "work")])
    finally:
        torch.set_num_threads(threads)
    return code, json.loads((d / "summary.json").read_text()), d / "work"


def test_cpu_branch_runs_every_section_and_passes(cpu_check):
    code, summary, _ = cpu_check
    rows = summary["rows"]
    assert code == 0 and summary["ok"], [r for r in rows if r["status"] == "FAIL"]
    by_section = {}
    for r in rows:
        by_section.setdefault(r["section"], []).append(r)
    judged = {s: sum(r["status"] == "ok" for r in by_section.get(s, [])) for s in ("tf32", "cache", "step1", "loader")}
    assert judged == {"tf32": 1, "cache": 3, "step1": 4, "loader": 2}, judged
    assert sum(r["status"] == "ok" for r in by_section["fused"]) == 4  # kd and ce: loss and gradients, ours
    for bench in ("student_step", "precompute"):  # ran (tiny, in-process), not skipped
        assert [r for r in by_section[bench] if r["check"].startswith("V=512")], by_section[bench]
        assert not [r for r in by_section[bench] if r["status"] in ("skip", "FAIL")]


def test_checks_fail_on_wrong_numbers(cpu_check):
    """The same comparisons against a wrong model or a wrong α exceed the tolerance by far."""
    import gpu_check_stages as st

    _, _, work = cpu_check
    e2e = work / "e2e"
    a = {"teacher": str(e2e / "teacher"), "student": str(e2e / "student")}
    right = st.check_cache(a, e2e / "cache")
    wrong = st.check_cache({"teacher": a["student"]}, e2e / "cache")  # the student as the "teacher"
    tol = st.tolerance(torch.float32, right["zmax"])
    assert right["value_err"] <= tol < wrong["value_err"] / 100
    step = st.check_step1(a, e2e / "cache", e2e / "run", alpha=0.25)  # the run trained α = 0.5
    assert step["loss_err"] > 10 * st.tolerance(torch.bfloat16, step["zmax"])


def test_allow_tf32_leaves_a_cpu_process_alone():
    from pipeline.distributed import allow_tf32

    m = torch.backends.cuda.matmul
    flag = "fp32_precision" if hasattr(m, "fp32_precision") else "allow_tf32"  # torch >= 2.9, else the legacy flag
    before = getattr(m, flag)
    assert allow_tf32(torch.device("cpu")) is False
    assert getattr(m, flag) == before


def _samples(n: int):
    from pipeline.data import Sample

    rng = np.random.default_rng(0)
    return [Sample(f"s{i}", rng.integers(0, 50, 6 + i).astype(np.int32), np.ones(6 + i, dtype=bool)) for i in range(n)]


@pytest.mark.parametrize("workers, pin, pinned_in", [(1, True, "kd-loader"), (1, False, None), (0, True, None)])
def test_prefetcher_pins_in_its_worker_thread_only(monkeypatch, workers, pin, pinned_in):
    """With ``pin_memory`` the worker thread pins every collated batch (``Batch.pin_memory``
    itself needs CUDA: recorded here instead); inline (no workers) or without it, nothing is
    pinned; the batches are the same either way."""
    from pipeline.data.batch import Batch
    from pipeline.student.sampler import StepPrefetcher, StepSampler

    calls = []
    monkeypatch.setattr(Batch, "pin_memory", lambda self: calls.append(threading.current_thread().name) or self)
    src = _samples(8)
    loader = StepPrefetcher(StepSampler(np.arange(8), 2, 2, 0, 1, seed=0), src, workers, 1, pin_memory=pin)
    plain = StepPrefetcher(StepSampler(np.arange(8), 2, 2, 0, 1, seed=0), src, 0)
    try:
        for _ in range(2):
            got, want = loader.next_step(), plain.next_step()
            assert [b.sample_ids for b in got] == [b.sample_ids for b in want]
            assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(got, want))
    finally:
        loader.close()
    if pinned_in is None:
        assert calls == []
    else:
        assert len(calls) >= 4 and all(name.startswith(pinned_in) for name in calls)


def test_batch_to_cpu_copies_nothing():
    from pipeline.data.batch import collate

    b = collate(_samples(3))
    moved = b.to(torch.device("cpu"))
    assert all(getattr(moved, f) is getattr(b, f) for f in b._DEVICE_FIELDS)
