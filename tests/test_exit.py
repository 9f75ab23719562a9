"""Ranks exit cleanly: a 2-rank stage run again and again beside a busy core never aborts at
process-group teardown (``terminate called without an active exception`` once failed CI).
The 100-run measurement is ``scripts/exit_stress.py``; this keeps a short version (one run; every other 2-rank test of the suite
exits the same way beside the other pytest worker) in the suite."""
import subprocess
import sys

import pytest

from conftest import run_cli, train_config, write_yaml


@pytest.mark.slow  # make test skips it; .ci/run runs it
def test_two_rank_run_beside_a_busy_core_exits_cleanly(assets, caches, tmp_path):
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for i in range(1):
            cfg = write_yaml(tmp_path / f"t{i}.yaml", train_config(assets, caches, tmp_path / f"run{i}", micro_batch_size=1,
                                                                   max_steps=2, eval_steps=2, save_steps=2))
            res = run_cli(["stages.train_student", "--config", str(cfg)], nproc=2)
            assert res.returncode == 0 and "terminate called" not in res.stderr, (i, res.stderr[-3000:])
            assert (tmp_path / f"run{i}" / "final" / "model.safetensors").is_file()
    finally:
        busy.kill()
        busy.wait()
