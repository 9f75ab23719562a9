"""inspect-losses on a hand-written two-round loss log: summary, hardest, compare, plot."""
import pytest

from pipeline.losslog.reader import compare_rounds, hardest, load_loss_logs, summary
from pipeline.losslog.writer import LossLogWriter


def _rows(ids, ntok, loss):
    return {"sample_id": ids, "n_tokens": ntok, "ce_sum": [2 * x for x in loss], "kl_sum": [0.5 * x for x in loss],
            "distill_sum": [0.25 * x for x in loss], "loss_sum": loss, "top1_agree": [0] * len(ids), "topk_mass_sum": [0.0] * len(ids),
            "teacher_entropy_sum": [0.0] * len(ids)}


@pytest.fixture()
def run_dir(tmp_path):
    w = LossLogWriter(tmp_path / "loss_logs", rank=0)
    w.append(0, "train", 0, 1, _rows(["a", "b", "c"], [10, 10, 20], [10.0, 30.0, 20.0]))  # 1.0, 3.0, 1.0 per token
    w.append(0, "train", 1, 2, _rows(["a"], [10], [20.0]))                                 # a: 30/20 = 1.5
    w.append(1, "train", 0, 1, _rows(["a", "b", "c"], [10, 10, 20], [5.0, 29.0, 60.0]))   # 0.5, 2.9, 3.0
    w.append(1, "eval", 0, 1, _rows(["x"], [4], [8.0]))
    w.close()
    LossLogWriter(tmp_path / "loss_logs", rank=1).close()
    return tmp_path


def test_summary_hardest_and_compare(run_dir):
    t = load_loss_logs(run_dir)
    s = {(r["round"], r["split"]): r for r in summary(t)}
    assert s[(0, "train")]["rows"] == 4 and s[(0, "train")]["samples"] == 3 and s[(0, "train")]["tokens"] == 50
    assert s[(0, "train")]["loss_per_token"] == pytest.approx(80 / 50)
    assert s[(0, "train")]["ce_per_token"] == pytest.approx(160 / 50)
    assert hardest(t.filter(t["round"].to_numpy() == 0), 1)["sample_id"].to_pylist() == ["b"]
    c = compare_rounds(t, 0, 1).to_pylist()
    assert [r["sample_id"] for r in c] == ["c", "a", "b"]
    assert [round(r["delta"], 6) for r in c] == [2.0, -1.0, -0.1]
    assert load_loss_logs(run_dir, round_=1, split="eval").num_rows == 1


def test_cli_compare_and_plot(run_dir, capsys):
    from stages.inspect_losses import main

    assert main([str(run_dir), "--compare", "0", "1", "--top", "2", "--plot", str(run_dir / "p.png")]) == 0
    out = capsys.readouterr().out
    moved = out.split("moved most from round 0 to 1")[1].splitlines()[2:4]
    assert [line.split()[0] for line in moved] == ["c", "a"]
    assert (run_dir / "p.png").stat().st_size > 1000


def test_distill_column_and_logs_written_before_it(run_dir):
    """``distill_sum`` is summarised like the other losses; a part file written before the
    column existed (forward KL only) reads with ``distill_sum = kl_sum``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    s = {(r["round"], r["split"]): r for r in summary(load_loss_logs(run_dir))}
    assert s[(0, "train")]["distill_per_token"] == pytest.approx(0.25 * 80 / 50)
    old = run_dir / "loss_logs" / "round=2" / "split=train" / "rank=0"
    old.mkdir(parents=True)
    cols = {"sample_id": ["a"], "epoch": pa.array([0], pa.int32()), "step": pa.array([1], pa.int64()),
            "n_tokens": pa.array([10], pa.int32()), **{c: pa.array([v], pa.float32()) for c, v in
                                                       (("ce_sum", 4.0), ("kl_sum", 2.0), ("loss_sum", 3.0))},
            "top1_agree": pa.array([0], pa.int32())}
    pq.write_table(pa.table(cols), old / "part-00000.parquet")
    t = load_loss_logs(run_dir, round_=2)
    assert t["distill_sum"].to_pylist() == [2.0] and t["topk_mass_sum"].to_pylist() == [None]
