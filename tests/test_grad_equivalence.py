"""One optimizer step is one big batch: whatever the micro-batch size, accumulation and world size."""
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "dist_grad_check.py"


def _run(out: Path, mbs: int, accum: int, nproc: int = 1) -> dict:
    env_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*env_cmd, str(SCRIPT), str(out), str(mbs), str(accum)], capture_output=True, text=True,
                         timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _assert_same(a: dict, b: dict) -> None:
    assert a["n_tokens"] == b["n_tokens"]
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"])
    for name, ref in b["delta"].items():
        got = a["delta"][name]
        # the parameter change is the gradient (SGD, lr=1): compare within 1e-5 of its scale
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()), msg=lambda m: f"{name}: {m}")
    assert any(float(d.abs().max()) > 0 for d in b["delta"].values())


def test_accumulation_equals_one_big_batch(tmp_path):
    big = _run(tmp_path / "big.pt", mbs=8, accum=1)
    acc = _run(tmp_path / "acc.pt", mbs=2, accum=4)
    assert len(set(acc["micro_valid"])) > 1, "micro-batches must hold different valid-token counts"
    _assert_same(acc, big)


def test_two_ranks_equal_one_rank(tmp_path):
    one = _run(tmp_path / "one.pt", mbs=8, accum=1)
    two = _run(tmp_path / "two.pt", mbs=2, accum=2, nproc=2)
    assert len(set(two["micro_valid"])) > 1
    _assert_same(two, one)
