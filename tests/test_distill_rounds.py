"""``distill-rounds``: two rounds of generate → precompute-teacher → train-student end to end on
the tiny models; the driver SIGKILLed at a random step and rerun gives the uninterrupted
weights and loss-log rows; inspect-losses reads across rounds; bad configs are one line; every
round's inputs and lengths are checked before round 0 runs; a rerun with a changed config is
refused (``--restart`` starts over); a corrupt ``rounds.json`` is named."""
import collections
import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow.dataset as pads
import pytest
from conftest import ROOT, precompute_config, run_cli, train_config, write_yaml
from safetensors.torch import load_file
from test_generate import gen_config

from pipeline.config import DistillRoundsConfig
from pipeline.rounds_driver import STEPS, read_state, round_configs
from pipeline.rounds_driver.checks import start_over


def driver_config(assets, caches, tmp, out) -> dict:
    """Round 0: sequence-level KD on the teacher's samples, a random student; round 1: on-policy
    (round 0's student samples), mixed 1:1 with the human-text cache."""
    gen = write_yaml(tmp / "gen.yaml", gen_config(assets, tmp / "unused-gen"))
    pre_cfg = precompute_config(assets, tmp / "unused-cache")
    del pre_cfg["dataset"]["max_length"]  # the driver's: the longest generated row (48 + 10)
    pre = write_yaml(tmp / "pre.yaml", pre_cfg)
    tr = train_config(assets, caches, tmp / "unused-run", max_steps=4, eval_steps=4, save_steps=2,
                      loss={"divergence": "reverse_kl"})
    return {"output_dir": str(out), "rounds": 2, "generate": {"config": str(gen)},
            "precompute": {"config": str(pre)}, "train": {"config": str(write_yaml(tmp / "train.yaml", tr))},
            "per_round": [{"model": "teacher"},
                          {"extra_caches": [{"path": str(caches["train"]), "weight": 1.0}]}]}


def _rows(run_dir):
    t = pads.dataset(run_dir / "loss_logs", format="parquet", partitioning="hive").to_table().to_pandas()
    return sorted(zip(t["round"], t["split"], t["step"], t["sample_id"], t["rank"], t["loss_sum"]))


@pytest.fixture(scope="module")
def reference(assets, caches, tmp_path_factory):
    """An uninterrupted 2-round run."""
    d = tmp_path_factory.mktemp("rounds-ref")
    cfg = write_yaml(d / "rounds.yaml", driver_config(assets, caches, d, d / "out"))
    res = run_cli(["stages.distill_rounds", "--config", str(cfg)], subprocess_=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return d / "out"


def test_two_rounds_end_to_end(assets, caches, reference):
    state = read_state(reference)
    assert sorted(state["steps"]) == sorted(f"round-{r}/{s}" for r in (0, 1) for s in STEPS)
    for r in (0, 1):
        rd = reference / f"round-{r}"
        assert json.loads((rd / "generated" / "generation.json").read_text())["complete"]
        assert json.loads((rd / "cache" / "manifest.json").read_text())["complete"]
        assert (rd / "student" / "final" / "model.safetensors").is_file()
    gen1 = json.loads((reference / "round-1" / "generated" / "generation.json").read_text())
    assert "round-0/student/final" in json.dumps(gen1)  # round 1 samples from round 0's student
    train1 = (reference / "round-1" / "train.yaml").read_text()
    assert "round-0/student/final" in train1 and "round-1/cache" in train1 and str(caches["train"]) in train1
    rows = {r[0] for r in _rows(reference / "round-1" / "student")}
    assert rows == {1}  # the round number is in the loss logs
    ids = {r[3] for r in _rows(reference / "round-1" / "student") if r[1] == "train"}
    assert {i.split(":", 1)[0] for i in ids} == {"0", "1"}  # on-policy and human samples mixed
    # inspect-losses reads the whole run: both rounds in one report
    res = run_cli(["stages.inspect_losses", str(reference)])
    assert res.returncode == 0, res.stderr
    summary = res.stdout.split("hardest")[0]
    assert all(any(line.split()[:2] == [str(r), "train"] for line in summary.splitlines()) for r in (0, 1)), summary


def test_sigkill_of_the_driver_then_rerun_equals_uninterrupted(assets, caches, reference, tmp_path):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "rounds.yaml", driver_config(assets, caches, tmp_path, out))
    # a random point among the steps' outputs appearing (seeded: the failing point can be rerun)
    point = random.Random(int(os.environ.get("KD_TEST_SEED", "0"))).choice(
        ["round-0/student/checkpoints/step-00000002", "round-1/cache", "round-1/generated",
         "round-1/student/checkpoints/step-00000002"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "stages.distill_rounds", "--config", str(cfg)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time()
    while not (out / point).exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < 300, f"{point} never appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "round-1" / "student" / "final").exists()
    res = run_cli(["stages.distill_rounds", "--config", str(cfg)], subprocess_=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already complete" in res.stdout
    for r in (0, 1):
        a = load_file(reference / f"round-{r}" / "student" / "final" / "model.safetensors")
        b = load_file(out / f"round-{r}" / "student" / "final" / "model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), (point, r)
        assert _rows(out / f"round-{r}" / "student") == _rows(reference / f"round-{r}" / "student"), (point, r)


def test_bad_round_config_is_one_line_and_runs_nothing(assets, caches, tmp_path):
    cfg = driver_config(assets, caches, tmp_path, tmp_path / "out")
    cfg["per_round"][1]["train"] = {"optim": {"lr": -1}}
    res = run_cli(["stages.distill_rounds", "--config", str(write_yaml(tmp_path / "bad.yaml", cfg))])
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "round 1 train config" in res.stderr and "optim.lr" in res.stderr
    assert not (tmp_path / "out" / "rounds.json").exists()
    cfg = driver_config(assets, caches, tmp_path, tmp_path / "out")
    cfg["per_round"][0] = {}  # round 0 would generate from a random student
    with pytest.raises(Exception, match="per_round\\[0\\].model"):
        round_configs(DistillRoundsConfig.model_validate(cfg))


@pytest.mark.parametrize("case,names", [
    ("teacher", ["round 1 generate config", "'model'", "no-such-teacher", "before round 0 runs"]),
    ("precompute", ["round 1 precompute config", "'teachers.0.path'", "no-such-teacher"]),
    ("max_length", ["round 0 precompute config", "'dataset.max_length' is 20", "58 tokens",
                    "dataset.max_length 48 + sampling.max_new_tokens 10"]),
    ("twice", ["round 1 train config", "data.train_caches", "listed twice"]),
])
def test_every_round_is_checked_before_round_0_runs(assets, caches, tmp_path, case, names):
    """Inputs a later round needs and lengths that would cut generated rows are found before
    anything runs (one line, nothing written), not after the earlier rounds' work."""
    cfg = driver_config(assets, caches, tmp_path, tmp_path / "out")
    missing = str(tmp_path / "no-such-teacher")
    cfg["per_round"][1].update({"teacher": {"model": missing},
                                "precompute": {"precompute": {"teachers": [{"path": missing}]}},
                                "twice": {"extra_caches": [{"path": str(caches["train"])}] * 2}}.get(case, {}))
    if case == "max_length":
        cfg["per_round"][0]["precompute"] = {"dataset": {"max_length": 20}}
    res = run_cli(["stages.distill_rounds", "--config", str(write_yaml(tmp_path / "bad.yaml", cfg))])
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    for name in names:
        assert name in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_precompute_length_follows_the_generated_rows(assets, caches, tmp_path):
    cfg = driver_config(assets, caches, tmp_path, tmp_path / "out")
    cfg["per_round"][1]["generate"] = {"sampling": {"max_new_tokens": 30}}
    rounds = round_configs(DistillRoundsConfig.model_validate(cfg))
    # the longest prompt kept (generate's dataset.max_length 48) + max_new_tokens
    assert [r["precompute"].dataset.max_length for r in rounds] == [48 + 10, 48 + 30]


def test_changed_config_is_refused_and_restart_starts_over(assets, caches, reference, tmp_path):
    """A finished run rerun with the same config has nothing to do; with a changed setting of a
    step that ran it is refused (naming the key, both values and --restart), config.yaml kept."""
    d = reference.parent
    cfg = driver_config(assets, caches, d, reference)
    res = run_cli(["stages.distill_rounds", "--config", str(write_yaml(tmp_path / "same.yaml", cfg))])
    assert res.returncode == 0 and res.stdout.count("already complete") == 6, res.stdout + res.stderr
    recorded = (reference / "config.yaml").read_text()
    cfg["per_round"][1]["generate"] = {"sampling": {"temperature": 0.7}}
    res = run_cli(["stages.distill_rounds", "--config", str(write_yaml(tmp_path / "changed.yaml", cfg))])
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    for name in ("round 1 generate config", "'sampling.temperature' is 0.7 now but 1.0", "--restart",
                 str(reference / "round-1" / "generate.yaml")):
        assert name in res.stderr, res.stderr
    assert (reference / "config.yaml").read_text() == recorded
    assert not (reference / "run.lock").exists()
    # --restart deletes what the driver wrote (and only that) before running every round
    out = tmp_path / "copy"
    for name in ("round-0", "round-1"):
        (out / name / "student").mkdir(parents=True)
    for name in ("rounds.json", "config.yaml", "notes.txt"):
        (out / name).write_text("{}")
    said = []
    start_over(out, said.append)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and "round-0" in said[0]


def test_corrupt_rounds_json_is_named(assets, caches, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "rounds.json").write_text('{"steps": {"round-0/gen')
    cfg = write_yaml(tmp_path / "r.yaml", driver_config(assets, caches, tmp_path, out))
    res = run_cli(["stages.distill_rounds", "--config", str(cfg)])
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert str(out / "rounds.json") in res.stderr and "delete it and rerun" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["rounds.json"]


def test_two_ranks_per_stage_give_the_one_rank_round(assets, caches, reference, tmp_path):
    """nproc_per_node=2 (every stage under torchrun): round 0 generates the same rows and caches the
    same targets as at 1 rank, and trains one global batch per step."""
    import torch

    cfg = driver_config(assets, caches, tmp_path, tmp_path / "out")
    cfg.update(nproc_per_node=2, rounds=1, per_round=[{"model": "teacher", "train": {"micro_batch_size": 1}}])
    res = run_cli(["stages.distill_rounds", "--config", str(write_yaml(tmp_path / "r2.yaml", cfg))],
                  subprocess_=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "torch.distributed.run" in res.stdout
    out, ref = tmp_path / "out" / "round-0", reference / "round-0"
    from test_generate import rows as gen_rows
    key = ("id", "prompt_ids", "completion_ids")
    assert [[r[k] for k in key] for r in gen_rows(out / "generated")] == \
        [[r[k] for k in key] for r in gen_rows(ref / "generated")]

    from pipeline.cache import open_cache
    ca, cb = ({r.sample_id: r for r in open_cache(d / "cache")} for d in (ref, out))
    assert ca.keys() == cb.keys()
    for sid in ca:  # the same tokens and teacher targets, whatever the world size
        assert (ca[sid].input_ids == cb[sid].input_ids).all() and (ca[sid].topk_ids == cb[sid].topk_ids).all()
        torch.testing.assert_close(cb[sid].topk_logprobs, ca[sid].topk_logprobs, rtol=0, atol=1e-5)

    # the cache's sample order follows its shards (one per rank), so the draws differ from the
    # 1-rank run's; each step still trains on one global batch of 2 samples
    def per_step(d):
        rows = [(s, sid) for _, split, s, sid, _, _ in _rows(d / "student") if split == "train"]
        return sorted(collections.Counter(s for s, _ in rows).items())
    assert per_step(out) == per_step(ref) == [(s, 2) for s in range(1, 5)]
    assert (out / "student" / "final" / "model.safetensors").is_file()
