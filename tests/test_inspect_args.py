"""The inspectors' arguments checked against what exists: a round, split or column that a run's
loss logs do not have is one line naming it and listing what is there (exit 2), not an empty
report or a KeyError. Local loss logs written by the real writer (its schema, whatever columns
it has)."""
from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.losslog.writer import SCHEMA, LossLogWriter


def _rows(ids: list[str], ntok: list[int], loss: list[float]) -> dict[str, list]:
    """One row per ID with every column of the writer's schema (whatever columns it has)."""
    rows: dict[str, list] = {"sample_id": ids, "n_tokens": ntok}
    for field in SCHEMA:
        if field.name in rows or field.name in ("epoch", "step"):
            continue
        rows[field.name] = [int(x) if pa.types.is_integer(field.type) else float(x) for x in loss]
    return rows


@pytest.fixture()
def run_dir(tmp_path):
    """Round 0: train; round 1: train and eval."""
    w = LossLogWriter(tmp_path / "loss_logs", rank=0)
    w.append(0, "train", 0, 1, _rows(["a", "b"], [10, 10], [10.0, 30.0]))
    w.append(1, "train", 0, 1, _rows(["a", "b"], [10, 10], [5.0, 29.0]))
    w.append(1, "eval", 0, 1, _rows(["x"], [4], [8.0]))
    w.close()
    return tmp_path


def _error(capsys) -> str:
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("argv,words", [
    (["--round", "5"], "round 5 not in {logs} (rounds: 0, 1)"),
    (["--round", "0", "--split", "eval"], "split eval not in round 0 of {logs} (splits: train)"),
    (["--compare", "0", "7"], "--compare: round 7 has no train rows in {logs} (rounds with train rows: 0, 1)"),
    (["--round", "0", "--compare", "0", "1"], "--round 0 keeps only round 0: drop --round"),
    (["--split", "eval", "--compare", "0", "1"], "--split eval leaves it out: drop --split"),
])
def test_inspect_losses_names_what_does_not_exist(run_dir, capsys, argv, words):
    from stages.inspect_losses import main

    assert main([str(run_dir), *argv]) == 2
    line = _error(capsys)
    assert line.startswith("inspect-losses: error: ") and words.format(logs=run_dir / "loss_logs") in line, line


def test_inspect_losses_existing_selection_still_reports(run_dir, capsys):
    from stages.inspect_losses import main

    assert main([str(run_dir), "--round", "1", "--split", "eval"]) == 0
    assert "1 rows" in capsys.readouterr().out
    assert main([str(run_dir), "--compare", "0", "1", "--top", "1"]) == 0
    assert "moved most from round 0 to 1" in capsys.readouterr().out


def test_inspect_losses_without_logs(tmp_path, capsys):
    from stages.inspect_losses import main

    assert main([str(tmp_path)]) == 2
    assert _error(capsys) == f"inspect-losses: error: no loss logs in {tmp_path} (expected {tmp_path / 'loss_logs'})"


def test_missing_metric_column_is_named(run_dir):
    """Logs without a metric's column (written before it existed): the column and the columns
    there are named."""
    from pipeline.losslog.reader import check_metric, load_loss_logs

    table = load_loss_logs(run_dir)
    check_metric(table, "loss", run_dir)
    with pytest.raises(ValueError, match=r"column kl_sum \(--metric kl\) not in the loss logs of .*\(columns: "
                                         r"sample_id, .*loss_sum"):
        check_metric(table.drop_columns(["kl_sum"]), "kl", run_dir)


def test_logged_rounds(run_dir, tmp_path):
    from pipeline.losslog.reader import logged_rounds

    assert logged_rounds(run_dir) == {0: ["train"], 1: ["eval", "train"]}
    assert logged_rounds(tmp_path / "nothing") == {}


def test_inspect_cache_max_samples_must_be_positive(tmp_path, capsys):
    from stages.inspect_cache import main

    assert main([str(tmp_path), "--max-samples", "0"]) == 2
    assert _error(capsys) == "inspect-cache: error: --max-samples 0: must be at least 1"
