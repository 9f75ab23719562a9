"""Checkpoints: a run killed with SIGKILL and resumed equals an uninterrupted run (weights and
loss-log rows); SIGTERM checkpoints and exits 0; early stopping; checkpoint rotation."""
import json
import os
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
    # 1 rank: two kills (mid-epoch, then again after resuming); 2 ranks: one kill, whose resume
    # crosses the epoch boundary (step 10); every launch of 2 ranks costs ~10 s of start-up
    for kill_after in ("step-00000003", "step-00000009") if nproc == 1 else ("step-00000009",):
        proc = _popen(cfg, nproc)
        _wait_for(tmp_path / "run" / "checkpoints" / kill_after, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "run" / "final").exists()
    code, out, err = _run_to_end(cfg, nproc)
    assert code == 0, err[-2000:]
    assert "resumed from" in out and "shuffle streams (8 streams" in out  # the default loader
    a = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    b = load_file(tmp_path / "run" / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    rows = _train_rows(tmp_path / "run")
    assert rows == _train_rows(tmp_path / "ref")
    assert len(rows) == len(set(rows))
    assert len(list((tmp_path / "run" / "checkpoints").glob("step-*"))) == 2  # save_total_limit


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
