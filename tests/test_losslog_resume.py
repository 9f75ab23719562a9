"""Loss logs under every resume and edit, at the writer: a resume trims the rows after its step
in every rank's files whatever the new world size; part names are never reused, so deleting a
part loses no later rows; rows of non-finite steps are left out of round selection and counted.
(The whole 2-rank job SIGKILLed and rerun, and resumed at one rank: tests/test_resume.py.)"""
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import run_cli, train_config, write_yaml
from test_inspect import _rows as _row_values

from pipeline.config import SelectConfig
from pipeline.losslog.reader import load_loss_logs
from pipeline.losslog.writer import LossLogWriter
from pipeline.student.callbacks import Callback
from pipeline.student.rounds import finite_rows, sample_weights, select_sample_ids


def _write(log_dir, rank: int, steps, ids=("a", "b")) -> LossLogWriter:
    """A writer of ``rank`` that logged one part per step (``ids`` visited at each)."""
    w = LossLogWriter(log_dir, rank=rank)
    for s in steps:
        w.append(0, "train", 0, s, _row_values(list(ids), [4] * len(ids), [float(s)] * len(ids)))
        w.flush()
    return w


def test_resume_trims_every_rank_whatever_the_world_size(tmp_path):
    logs = tmp_path / "loss_logs"
    for k in range(3):
        _write(logs, k, range(1, 6)).close()
    # 3 → 2 ranks, resumed at step 2: rank 0 trims rank=0 and rank=2, rank 1 trims rank=1
    assert LossLogWriter(logs, rank=0).truncate_after(0, 2, world_size=2) == 2 * 3 * 2
    t = load_loss_logs(tmp_path)
    assert {(r, s) for r, s in zip(t["rank"].to_pylist(), t["step"].to_pylist()) if s > 2} == \
        {(1, s) for s in (3, 4, 5)}
    assert LossLogWriter(logs, rank=1).truncate_after(0, 2, world_size=2) == 3 * 2
    # → 1 rank at step 1: every rank's directory; parts left without rows are removed
    assert LossLogWriter(logs, rank=0).truncate_after(0, 1, world_size=1) == 3 * 2
    t = load_loss_logs(tmp_path)
    assert sorted(zip(t["rank"].to_pylist(), t["step"].to_pylist())) == [(k, 1) for k in range(3) for _ in "ab"]
    assert len(list(logs.rglob("*.parquet"))) == 3


def test_deleted_part_never_makes_a_later_part_overwrite_another(tmp_path):
    logs = tmp_path / "loss_logs"
    w = _write(logs, 0, [1, 2, 3])
    parts = sorted(logs.rglob("part-*.parquet"))
    assert len(parts) == 3
    parts[0].unlink()  # what the message for an unreadable part advises
    w.append(0, "train", 0, 4, _row_values(["a"], [4], [4.0]))
    w.close()
    w = _write(logs, 0, [5])  # the next attempt (a resumed run)
    w.close()
    names = [p.name for p in logs.rglob("part-*.parquet")]
    assert len(names) == len(set(names)) == 4
    steps = sorted(pq.read_table(p)["step"][0].as_py() for p in logs.rglob("part-*.parquet"))
    assert steps == [2, 3, 4, 5]  # nothing written after the deletion replaced a part


def test_nonfinite_rows_are_left_out_of_selection_and_counted(tmp_path):
    """A step skipped as non-finite logs NaN: such rows must not rank first (top_fraction), nor
    empty a quantile selection, nor weigh in loss-proportional sampling."""
    w = LossLogWriter(tmp_path / "loss_logs", rank=0)
    nan = math.nan
    # per token (kl): a 0.1, b 0.5, c 0.3, d 0.9; "a" also has a NaN visit, "n" only NaN visits
    w.append(0, "train", 0, 1, {**_row_values(["a", "b", "c", "d"], [10] * 4, [0.0] * 4),
                                 "kl_sum": [1.0, 5.0, 3.0, 9.0]})
    w.append(0, "train", 0, 2, {**_row_values(["a", "n"], [10, 10], [0.0, 0.0]), "kl_sum": [nan, nan]})
    w.close()
    t = load_loss_logs(tmp_path, round_=0, split="train")
    kept, excluded = finite_rows(t, ["kl"])
    assert excluded == 2 and kept.num_rows == 4
    assert select_sample_ids(t, SelectConfig(metric="kl", top_fraction=0.25)) == ["d"]
    assert select_sample_ids(t, SelectConfig(metric="kl", quantile=(0.5, 1.0))) == ["b", "d"]
    assert select_sample_ids(t, SelectConfig(metric="kl", threshold=0.0)) == ["a", "b", "c", "d"]
    weights = sample_weights(t, ["a", "n"], "kl")
    assert weights[0] == pytest.approx(0.1) and weights[1] == pytest.approx((0.1 + 0.5 + 0.3 + 0.9) / 4)


class NonFiniteVisit(Callback):
    """When round 0 ends, logs one more visit of ``sample_id`` with NaN losses in round 0's
    train log, as a step skipped as non-finite does."""

    def __init__(self, sample_id: str):
        self.sample_id = sample_id

    def on_round_end(self, state, summary):
        if state.round == 0:
            w = LossLogWriter(Path(state.output_dir).parent / "loss_logs", rank=state.rank)
            w.append(0, "train", 0, 99, _row_values([self.sample_id], [4], [math.nan]) | {"kl_sum": [math.nan]})
            w.close()


def test_selection_report_counts_the_rows_left_out(assets, caches, tmp_path):
    from pipeline.cache import open_cache

    sid = open_cache(caches["train"]).sample_ids[0]
    cfg = train_config(assets, caches, tmp_path / "run", max_steps=2, eval_steps=100,
                       callbacks=[{"target": "tests.test_losslog_resume:NonFiniteVisit", "sample_id": sid}],
                       rounds=[{}, {"max_steps": 1, "select": {"metric": "kl", "top_fraction": 0.5}}])
    cfg["data"]["shuffle"] = "global"  # the order in which the first stored sample is among the first steps' draws
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
    assert res.returncode == 0, res.stderr[-2000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("[rounds] round 1:"))
    assert "2 samples selected" in line and "1 row(s) of steps skipped as non-finite left out" in line, line
    t = load_loss_logs(tmp_path / "run", round_=1, split="train")
    assert len(set(t["sample_id"].to_pylist())) <= 2
