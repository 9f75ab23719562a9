"""Multi-round runs: selection from the previous round's loss log, run.json, resume mid-run."""
import json
import os
import signal

import numpy as np
import pyarrow.dataset as pads
import pytest
from conftest import train_config, write_yaml
from test_inspect import _rows
from test_resume import _popen, _run_to_end, _wait_for

from pipeline.config import SelectConfig
from pipeline.losslog.reader import load_loss_logs
from pipeline.losslog.writer import LossLogWriter
from pipeline.student.rounds import select_sample_ids


def test_selection_picks_exactly_the_intended_ids(tmp_path):
    w = LossLogWriter(tmp_path / "loss_logs", rank=0)
    # kl per token: a 0.1, b 0.5, c 0.3, d 0.9, e 0.2 (a visited twice: (1 + 3) / (10 + 10) = 0.2... see below)
    w.append(0, "train", 0, 1, {**_rows(["a", "b", "c", "d", "e"], [10] * 5, [0.0] * 5),
                                 "kl_sum": [1.0, 5.0, 3.0, 9.0, 2.0]})
    w.append(0, "train", 1, 2, {**_rows(["a"], [10], [0.0]), "kl_sum": [5.0]})  # a: (1 + 5) / 20 = 0.3
    w.close()
    t = load_loss_logs(tmp_path, round_=0, split="train")
    assert select_sample_ids(t, SelectConfig(top_fraction=0.4)) == ["b", "d"]
    assert select_sample_ids(t, SelectConfig(top_fraction=0.5)) == ["a", "b", "d"]  # ceil(2.5) = 3; a ties c, a wins
    assert select_sample_ids(t, SelectConfig(threshold=0.3)) == ["a", "b", "c", "d"]
    assert select_sample_ids(t, SelectConfig(quantile=(0.25, 0.75))) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="exactly one"):
        SelectConfig(top_fraction=0.3, threshold=1.0)


def test_random_selection_is_seeded_sized_and_ignores_the_losses(tmp_path):
    import pyarrow as pa

    ids = [f"s{i:03d}" for i in range(200)]
    w = LossLogWriter(tmp_path / "loss_logs", rank=0)
    w.append(0, "train", 0, 1, {**_rows(ids, [10] * 200, [0.0] * 200), "kl_sum": [float(i) for i in range(200)]})
    w.close()
    t = load_loss_logs(tmp_path, round_=0, split="train")
    sel = SelectConfig(random_fraction=0.5)
    a = select_sample_ids(t, sel, seed=3, round_=1)
    assert len(a) == 100 and len(set(a)) == 100 and a == sorted(a) and set(a) <= set(ids)
    assert select_sample_ids(t, sel, seed=3, round_=1) == a  # same seed and round: same draw
    assert select_sample_ids(t, sel, seed=4, round_=1) != a and select_sample_ids(t, sel, seed=3, round_=2) != a
    # the row order of the log does not change the draw; the losses are not used
    shuffled = t.take(pa.array(np.random.default_rng(0).permutation(len(t))))
    assert select_sample_ids(shuffled, sel, seed=3, round_=1) == a
    flat = t.set_column(t.schema.get_field_index("kl_sum"), "kl_sum", pa.array([1.0] * 200))
    assert select_sample_ids(flat, sel, seed=3, round_=1) == a
    # not the hardest half: a uniform draw takes about half of the upper half
    assert 30 < sum(s >= "s100" for s in a) < 70
    assert len(select_sample_ids(t, SelectConfig(random_fraction=0.01), seed=0, round_=1)) == 2  # ceil(2.0)


def _three_rounds(assets, caches, out):
    cfg = train_config(assets, caches, out, micro_batch_size=4, max_steps=10, save_steps=3, eval_steps=10,
                       rounds=[{}, {"max_steps": 5, "select": {"metric": "kl", "top_fraction": 0.5}},
                               {"max_steps": 10, "optim": {"lr": 1e-3}}])
    cfg["data"]["shuffle"] = "global"  # one epoch of 10 steps × 4 visits each of the 40 samples once
    return cfg


def _rows_of(run):
    t = pads.dataset(run / "loss_logs", format="parquet", partitioning="hive").to_table().to_pandas()
    return t, sorted(zip(t["round"], t["split"], t["step"], t["sample_id"]))


def test_three_rounds_select_and_resume(assets, caches, tmp_path):
    ref = write_yaml(tmp_path / "ref.yaml", _three_rounds(assets, caches, tmp_path / "ref"))
    code, out, err = _run_to_end(ref, 1)
    assert code == 0, err[-2000:]
    state = json.loads((tmp_path / "ref" / "run.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [0, 1, 2] and state["rounds"][1]["samples"] == 20
    t, ref_rows = _rows_of(tmp_path / "ref")
    train = t[t["split"] == "train"]
    expected = select_sample_ids(load_loss_logs(tmp_path / "ref", round_=0, split="train"),
                                 SelectConfig(metric="kl", top_fraction=0.5))
    assert sorted(train[train["round"] == 1]["sample_id"]) == sorted(expected)  # 5 steps × 4 = the 20 selected
    assert sorted(train[train["round"] == 2]["sample_id"]) == sorted(train[train["round"] == 0]["sample_id"])
    assert (tmp_path / "ref" / "round-2" / "final" / "model.safetensors").is_file()

    cfg = write_yaml(tmp_path / "run.yaml", _three_rounds(assets, caches, tmp_path / "run"))
    p = _popen(cfg, 1)
    _wait_for(tmp_path / "run" / "round-1" / "checkpoints" / "step-00000003", p)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    code, out, err = _run_to_end(cfg, 1)
    assert code == 0, err[-2000:]
    assert "round 0 already finished" in out and "resumed from" in out
    _, rows = _rows_of(tmp_path / "run")
    assert rows == ref_rows and len(rows) == len(set(rows))


def test_carry_optimizer_keeps_adam_moments_across_rounds(assets, caches, tmp_path):
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    cfg = write_yaml(tmp_path / "c.yaml", train_config(
        assets, caches, tmp_path / "run", micro_batch_size=4, eval_steps=100,
        rounds=[{"max_steps": 4}, {"max_steps": 3, "carry_optimizer": True},
                {"max_steps": 2, "carry_optimizer": True, "weight_by": "kl", "optim": {"lr": 1e-4}}]))
    code, out, err = _run_to_end(cfg, 1)
    assert code == 0, err[-2000:]
    assert out.count("optimizer state carried over") == 2 and "drawn ∝ kl per token" in out
    dcp_to_torch_save(tmp_path / "run" / "round-1" / "optimizer", tmp_path / "opt.pt")
    optim = torch.load(tmp_path / "opt.pt", weights_only=False)["optim"]
    steps = {float(s["step"]) for s in optim["state"].values()}
    assert steps == {7.0}  # 4 steps of round 0 + 3 of round 1: the AdamW moments went on
    # round 1's own schedule (lr 2e-3, warmup 2, cosine to 10% at its step 3), not round 0's values
    assert all(abs(g["lr"] - 2e-4) < 1e-12 and abs(g["initial_lr"] - 2e-3) < 1e-12 for g in optim["param_groups"])


def test_loss_weighted_sampling(tmp_path):
    import numpy as np

    from pipeline.student.sampler import StepSampler
    from pipeline.student.rounds import sample_weights

    w = LossLogWriter(tmp_path / "loss_logs", rank=0)
    w.append(0, "train", 0, 1, {**_rows(["a", "b", "c"], [10, 10, 10], [10.0, 30.0, 0.0])})
    w.close()
    t = load_loss_logs(tmp_path, round_=0, split="train")
    weights = sample_weights(t, ["a", "b", "c", "z"], "loss")  # z not in the log: mean weight
    np.testing.assert_allclose(weights, [1.0, 3.0, 1e-12, 4.0 / 3.0])
    s = StepSampler(np.arange(4), 4, 1, 0, 1, seed=0, weights=np.array([1.0, 0.0, 0.0, 3.0]))
    drawn = np.concatenate([np.concatenate(s.next_step()) for _ in range(2000)])
    counts = np.bincount(drawn, minlength=4) / len(drawn)
    assert counts[1] == counts[2] == 0
    assert abs(counts[3] - 0.75) < 0.02  # 8,000 draws: standard error ≈ 0.005
