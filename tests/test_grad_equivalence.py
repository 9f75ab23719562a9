"""One optimizer step is one big batch: whatever the micro-batch size, accumulation and world size."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "dist_grad_check.py"


def _run(out: Path, mbs: int, accum: int, nproc: int = 1, pack: int = 0, divergence: str = "forward_kl") -> dict:
    """One optimizer step of ``dist_grad_check.py``: in this process (one thread) at 1 rank,
    under torchrun at 2; returns what it saved."""
    if nproc == 1:
        from dist_grad_check import one_step  # tests/ is on sys.path (conftest.py)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one_step(str(out), mbs, accum, pack, divergence)
        finally:
            torch.set_num_threads(threads)
        return torch.load(out, weights_only=False)
    env_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*env_cmd, str(SCRIPT), str(out), str(mbs), str(accum), str(pack), divergence], capture_output=True, text=True,
                         timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _assert_same(a: dict, b: dict) -> None:
    assert a["n_tokens"] == b["n_tokens"]
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"])
    # the parameter change is the gradient (SGD, lr=1); float32 sums in another order differ in
    # the last bits, so compare norms: globally within 1e-5 relative, each tensor within 1e-4
    num = den = 0.0
    for name, ref in b["delta"].items():
        err = float((a["delta"][name] - ref).norm())
        assert err <= 1e-4 * float(ref.norm()) + 1e-12, f"{name}: |diff| {err:.3e} vs |grad| {float(ref.norm()):.3e}"
        num, den = num + err**2, den + float(ref.norm()) ** 2
    assert den > 0 and (num / den) ** 0.5 <= 1e-5, (num / den) ** 0.5


@pytest.fixture(scope="module")
def one_big_batch(tmp_path_factory) -> dict:
    """The reference: one rank, one micro-batch of all 8 samples (run once for the module)."""
    return _run(tmp_path_factory.mktemp("grad") / "big.pt", mbs=8, accum=1)


def test_accumulation_equals_one_big_batch(tmp_path, one_big_batch):
    big = one_big_batch
    acc = _run(tmp_path / "acc.pt", mbs=2, accum=4)
    assert len(set(acc["micro_valid"])) > 1, "micro-batches must hold different valid-token counts"
    _assert_same(acc, big)


def test_two_ranks_equal_one_rank(tmp_path, one_big_batch):
    one = one_big_batch
    two = _run(tmp_path / "two.pt", mbs=2, accum=2, nproc=2)
    assert len(set(two["micro_valid"])) > 1
    _assert_same(two, one)
    # the fused output layer adds no collective: per micro-step each FSDP group (blocks + root,
    # whose parameters include the output projection) is all-gathered once in the forward and
    # each block once more in the backward; one reduce-scatter per group, on the last micro-step
    c = two["comms"]
    assert c["all_gather"] == 2 * (2 * c["groups"] - 1) and c["reduce_scatter"] == c["groups"], c


def test_packing_equals_padding_and_two_packed_ranks_equal_one(tmp_path, one_big_batch):
    """Packed micro-batches (rows of 48 tokens, samples of 5-24 tokens): the same global token
    count, loss, per-sample rows and gradient as the padded run, at 1 and 2 ranks."""
    padded = one_big_batch
    packed = _run(tmp_path / "pack.pt", mbs=8, accum=1, pack=48)
    assert packed["micro_rows"][0] < padded["micro_rows"][0]  # several samples per row
    _assert_same(packed, padded)
    assert packed["rows"]["sample_id"] == padded["rows"]["sample_id"]
    assert packed["rows"]["n_tokens"] == padded["rows"]["n_tokens"]
    for col in ("ce_sum", "kl_sum"):
        for a, b in zip(packed["rows"][col], padded["rows"][col]):
            assert abs(a - b) <= 1e-5 * abs(b), (col, a, b)
    two = _run(tmp_path / "pack2.pt", mbs=2, accum=2, nproc=2, pack=48)
    _assert_same(two, padded)


def test_a_divergence_other_than_forward_kl_keeps_accumulation_and_two_rank_equivalence(tmp_path, one_big_batch):
    """JSD (β = 0.3): one big batch = 4 accumulated micro-batches = 2 ranks × 2; its value is
    not forward KL's, and the logged forward KL is unchanged by the choice."""
    big = _run(tmp_path / "big.pt", mbs=8, accum=1, divergence="jsd")
    assert abs(big["kl"] - one_big_batch["kl"]) <= 1e-6 * one_big_batch["kl"]
    assert abs(big["distill"] - big["kl"]) > 1e-3 * big["kl"] and one_big_batch["distill"] == one_big_batch["kl"]
    _assert_same(_run(tmp_path / "acc.pt", mbs=2, accum=4, divergence="jsd"), big)
    _assert_same(_run(tmp_path / "two.pt", mbs=2, accum=2, nproc=2, divergence="jsd"), big)
