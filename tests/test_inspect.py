"""inspect-losses on a hand-written two-round loss log: summary, hardest, compare, plot."""
import pytest

from pipeline.losslog.reader import compare_rounds, hardest, load_loss_logs, summary
from pipeline.losslog.writer import LossLogWriter


def _rows(ids, ntok, loss):
    return {"sample_id": ids, "n_tokens": ntok, "ce_sum": [2 * x for x in loss], "kl_sum": [0.5 * x for x in loss],
            "loss_sum": loss, "top1_agree": [0] * len(ids), "topk_mass_sum": [0.0] * len(ids),
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
