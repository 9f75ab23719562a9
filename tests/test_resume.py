"""Checkpoints: a run killed with SIGKILL and resumed equals an uninterrupted run (weights and
loss-log rows; at 2 ranks the whole job killed at seeded random points, one after the last
checkpoint, then resumed at 1 rank too); SIGTERM checkpoints and exits 0; early stopping;
checkpoint rotation."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.dataset as pads
import pytest
import torch
from conftest import ROOT, run_cli, train_config as _train_cfg, write_yaml
from safetensors.torch import load_file

from pipeline.student.callbacks import early_stopping_update


def _popen(cfg_path, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"] \
        if nproc > 1 else [sys.executable, "-m"]
    return subprocess.Popen([*launch, "stages.train_student", "--config", str(cfg_path)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _run_to_end(cfg_path, nproc, timeout=240) -> tuple[int, str, str]:
    """A run that is not killed: in this process at 1 rank (no interpreter start-up), under
    torchrun at 2. Returns (exit code, stdout, stderr)."""
    if nproc == 1:
        res = run_cli(["stages.train_student", "--config", str(cfg_path)])
        return res.returncode, res.stdout, res.stderr
    proc = _popen(cfg_path, nproc)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def _kill_job(proc, trigger, delay: float = 0.0) -> bool:
    """SIGKILL the whole job ``delay`` s after ``trigger`` appears, as a scheduler's preemption
    does: the launcher's process group and, under torchrun, each worker (torchrun starts every
    worker in a session of its own, so the launcher's group does not hold them: killing it
    alone leaves the ranks training). Polls every millisecond, the workers' PIDs known
    beforehand, to catch a short-lived ``trigger`` (``final.tmp``: the final save). Returns
    False when the job ended before ``trigger`` was seen (a kill that came too late)."""
    t0, workers = time.time(), []
    while not trigger.exists():
        if proc.poll() is not None:
            assert proc.returncode == 0, proc.communicate()[1][-2000:]
            return False
        assert time.time() - t0 < 120, f"{trigger} never appeared"
        if not workers and time.time() - t0 > 1:
            workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        time.sleep(0.001)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    workers += subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in set(workers):
        try:
            os.killpg(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return True


def _train_rows(run_dir):
    t = pads.dataset(run_dir / "loss_logs", format="parquet", partitioning="hive").to_table().to_pandas()
    return sorted(zip(t["split"], t["step"], t["sample_id"], t["rank"]))


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_then_resume_equals_uninterrupted(assets, caches, tmp_path, nproc):
    over = dict(micro_batch_size=4 // nproc, max_steps=14, save_steps=3, eval_steps=5, save_total_limit=2)
    ref_cfg = write_yaml(tmp_path / "ref.yaml", _train_cfg(assets, caches, tmp_path / "ref", **over))
    code, _, err = _run_to_end(ref_cfg, nproc)
    assert code == 0, err[-2000:]

    cfg = write_yaml(tmp_path / "run.yaml", _train_cfg(assets, caches, tmp_path / "run", **over))
    # 1 rank: two kills (mid-epoch, then again after resuming). 2 ranks, the whole job killed
    # (every launch costs ~10 s of start-up): once soon after step 9's checkpoint (the resume
    # crosses the epoch boundary, step 10), then after the last checkpoint (step 12): soon
    # after it, during the final save, or once the rows of steps 13-14 are closed (summary.json
    # is written after them); seeded, so a failing point can be rerun (KD_TEST_SEED)
    rng = random.Random(int(os.environ.get("KD_TEST_SEED", "0")))
    kills = [("checkpoints/step-00000003", 0.0), ("checkpoints/step-00000009", 0.0)] if nproc == 1 else \
        [("checkpoints/step-00000009", rng.uniform(0, 0.3)),
         rng.choice([("checkpoints/step-00000012", rng.uniform(0, 0.3)), ("final.tmp", 0.0), ("summary.json", 0.0)])]
    for trigger, delay in kills:
        assert _kill_job(_popen(cfg, nproc), tmp_path / "run" / trigger, delay) or trigger == "final.tmp", trigger
    code, out, err = _run_to_end(cfg, nproc)
    assert code == 0, (kills, err[-2000:])
    assert f"at step {9 if nproc == 1 else 12} (" in out  # resumed from the newest checkpoint
    assert "shuffle streams (8 streams" in out  # the default loader
    a = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    b = load_file(tmp_path / "run" / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    rows = _train_rows(tmp_path / "run")
    assert rows == _train_rows(tmp_path / "ref"), kills
    assert len(rows) == len(set(rows))
    assert len(list((tmp_path / "run" / "checkpoints").glob("step-*"))) == 2  # save_total_limit
    if nproc == 2:  # 2 → 1 rank: the ref run's newest checkpoint (step 12) resumed at one rank
        one = tmp_path / "one"
        shutil.copytree(tmp_path / "ref", one)
        shutil.rmtree(one / "final")
        over["micro_batch_size"] = 4  # the same global batch, so the same samples per step
        code, out, err = _run_to_end(write_yaml(tmp_path / "one.yaml", _train_cfg(assets, caches, one, **over)), 1)
        assert code == 0 and "at step 12" in out and "dropped" in out, err[-2000:]
        rows = _train_rows(one)
        assert not [r for r in rows if r[3] == 1 and r[1] > 12]  # rank 1's rows of steps 13-14 dropped
        visits = sorted(r[:3] for r in rows)
        assert visits == sorted(r[:3] for r in _train_rows(tmp_path / "ref"))  # every visit once


def test_sigterm_saves_a_checkpoint_and_exits_zero(assets, caches, tmp_path):
    cfg = write_yaml(tmp_path / "t.yaml", _train_cfg(assets, caches, tmp_path / "run", max_steps=100000,
                                                      eval_steps=100000, log_steps=1))
    proc = _popen(cfg, 1)
    _wait_for(tmp_path / "run" / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["outcome"] == "preempted"
    ckpts = list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer.pt").is_file()


def test_early_stopping_on_a_scripted_loss_sequence():
    losses = [5.0, 4.0, 3.95, 3.99, 3.5, 3.6, 3.55, 3.52]
    best, bad, stops, improved_at = float("inf"), 0, [], []
    for i, loss in enumerate(losses):
        best, bad, improved, stop = early_stopping_update(best, bad, loss, min_delta=0.1, patience=3)
        improved_at += [i] if improved else []
        stops.append(stop)
    assert improved_at == [0, 1, 4]          # 3.95 is not better than 4.0 by more than 0.1
    assert stops.index(True) == 7            # evals 5, 6, 7 without improvement
    assert best == 3.5
    assert not any(early_stopping_update(1.0, 5, 2.0, 0.0, None)[3:])


def test_sigterm_to_both_ranks_checkpoints_once_and_exits_zero(assets, caches, tmp_path):
    """SIGTERM to each rank (e.g. ``srun --signal`` or a scheduler signalling the workers): every
    rank stops after the same step, one checkpoint is written, all exit 0, so torchrun does."""
    cfg = write_yaml(tmp_path / "t.yaml", _train_cfg(assets, caches, tmp_path / "run", micro_batch_size=1,
                                                      max_steps=100000, eval_steps=100000, log_steps=1))
    proc = _popen(cfg, 2)
    _wait_for(tmp_path / "run" / "metrics.jsonl", proc)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    for pid in workers:
        os.kill(int(pid), signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    ckpts = list((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer.pt").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["outcome"] == "preempted"
    assert "preempted after step" in out
