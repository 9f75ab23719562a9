"""Callbacks (pipeline/student/callbacks.py): every event in order at 1 and 2 ranks, stop and save
requests (a request on one rank holds on all), state restored on resume, config errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.student.checkpoint import complete_checkpoints, verify_checkpoint
from tests.conftest import run_cli, train_config, write_yaml

HOOK = "tests.callback_hooks:Recorder"


def _events(log: Path, rank: int = 0) -> list[dict]:
    return [json.loads(x) for x in Path(f"{log}.rank{rank}.jsonl").read_text().splitlines()]


def _names(events: list[dict]) -> list[str]:
    return [f"{e['event']}@{e['step']}" for e in events]


def test_every_event_in_order_one_rank(assets, caches, tmp_path):
    log = tmp_path / "events"
    cfg = train_config(assets, caches, tmp_path / "run", max_steps=6, eval_steps=3, save_steps=4,
                       callbacks=[{"target": HOOK, "log": str(log)}])
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
    assert res.returncode == 0, res.stderr[-3000:]
    got = _names(_events(log))
    want = (["on_train_begin@0"] + [f"on_step_end@{s}" for s in (1, 2, 3)] + ["on_evaluate@3", "on_step_end@4", "on_save@4"]
            + [f"on_step_end@{s}" for s in (5, 6)] + ["on_evaluate@6", "on_train_end@6", "on_round_end@6"])
    assert got == want
    ev = _events(log)
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the metrics the callback saw are the ones logged (log_steps 1): the logger is a callback too
    assert [e["loss"] for e in ev if e["event"] == "on_step_end"] == [m["train/loss"] for m in metrics if "train/loss" in m]
    assert ev[-2]["outcome"] == "finished"
    assert str(tmp_path / "run" / "checkpoints" / "step-00000004") == [e for e in ev if e["event"] == "on_save"][0]["path"]


def test_stop_on_one_rank_stops_both_with_a_checkpoint(assets, caches, tmp_path):
    """Rank 1 alone asks to stop after step 3 and both ranks ask to save after step 1: every
    rank sees the same events, both save at step 1 and stop after step 3 with a checkpoint of
    it; final/ is exported; the outcome is rank 0's view of the agreed stop."""
    log = tmp_path / "events"
    out = tmp_path / "run"
    cfg = train_config(assets, caches, out, max_steps=8, eval_steps=2, save_steps=100,
                       callbacks=[{"target": HOOK, "log": str(log), "stop_at": 3, "stop_rank": 1, "save_at": 1}])
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    want = ["on_train_begin@0", "on_step_end@1", "on_save@1", "on_step_end@2", "on_evaluate@2", "on_step_end@3",
            "on_save@3", "on_train_end@3", "on_round_end@3"]
    assert _names(_events(log, 0)) == want and _names(_events(log, 1)) == want
    assert [Path(c).name for c in complete_checkpoints(out)] == ["step-00000001", "step-00000003"]
    assert verify_checkpoint(out / "checkpoints" / "step-00000003") is None
    assert (out / "final" / "model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["outcome"] == "stopped"
    assert "stopped after step 3" in res.stdout


def test_callback_state_is_restored_on_resume(assets, caches, tmp_path):
    """A stateful callback continues from its checkpointed state: 4 steps (checkpoint at 4), then
    the same run to 6 steps resumes at 4 and the callback's counter goes on from there."""
    log = tmp_path / "events"
    out = tmp_path / "run"
    for steps in (4, 6):
        cfg = train_config(assets, caches, out, max_steps=steps, eval_steps=100, save_steps=4,
                           callbacks=[{"target": HOOK, "log": str(log)}])
        res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
        assert res.returncode == 0, res.stderr[-3000:]
    ev = _events(log)
    assert "resumed from" in res.stdout
    # first run: begin, 4 steps, save (6 events, saved state seen=6), eval at 4, end, round end;
    # the resumed run starts from seen=6: its begin is the 7th event the callback counts
    second = ev[[e["event"] for e in ev].index("on_train_begin", 1):]
    assert second[0]["step"] == 4 and second[0]["seen"] == 7
    assert [e["step"] for e in second if e["event"] == "on_step_end"] == [5, 6]


@pytest.mark.parametrize("entry,match", [
    ({"target": "tests.no_such_module:X"}, "cannot import module 'tests.no_such_module'"),
    ({"target": "tests.callback_hooks:Missing"}, "has no 'Missing'"),
    ({"target": "tests.callback_hooks:Recorder", "log": "x", "bogus": 1}, "unexpected keyword argument 'bogus'"),
    ({"target": "tests.callback_hooks:needs_two", "a": 1}, "missing 1 required positional argument"),
    ({"target": "tests.callback_hooks"}, "must be 'package.module:Name'"),
    ({"target": "collections:OrderedDict"}, "none of the callback methods"),
])
def test_bad_callback_entry_is_one_line_naming_it(assets, caches, tmp_path, entry, match):
    out = tmp_path / "run"
    cfg = train_config(assets, caches, out, max_steps=2, callbacks=[{"target": HOOK, "log": str(tmp_path / "e")}, entry])
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert "callbacks[1]" in lines[-1] and match in lines[-1], lines[-1]
    assert "Traceback" not in res.stderr
    assert not out.exists()  # refused before anything was written


def test_the_same_callbacks_see_every_round(assets, caches, tmp_path):
    """Two rounds: one callback object sees begin ... end, round end for each round in turn."""
    log = tmp_path / "events"
    cfg = train_config(assets, caches, tmp_path / "run", max_steps=2, eval_steps=2,
                       callbacks=[{"target": HOOK, "log": str(log)}], rounds=[{}, {"max_steps": 1}])
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
    assert res.returncode == 0, res.stderr[-3000:]
    ev = _events(log)
    assert [(e["round"], f"{e['event']}@{e['step']}") for e in ev] == [
        (0, "on_train_begin@0"), (0, "on_step_end@1"), (0, "on_step_end@2"), (0, "on_evaluate@2"),
        (0, "on_train_end@2"), (0, "on_round_end@2"),
        (1, "on_train_begin@0"), (1, "on_step_end@1"), (1, "on_evaluate@1"), (1, "on_train_end@1"), (1, "on_round_end@1")]
    assert [e["seen"] for e in ev] == list(range(1, len(ev) + 1))  # one object across rounds


def test_early_stopping_is_a_callback_and_stops_after_patience(assets, caches, tmp_path):
    """patience 1 with min_delta 100: the first eval (step 2) is the best, the second (step 4)
    does not improve by 100 nats, so the round ends after step 4 with outcome early_stopped,
    final/ exported and no checkpoint for the stop; a user callback sees the same end."""
    log = tmp_path / "events"
    out = tmp_path / "run"
    cfg = train_config(assets, caches, out, max_steps=10, eval_steps=2, save_steps=100,
                       early_stopping={"patience": 1, "min_delta": 100.0}, callbacks=[{"target": HOOK, "log": str(log)}])
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["outcome"] == "early_stopped"
    assert _names(_events(log))[-4:] == ["on_step_end@4", "on_evaluate@4", "on_train_end@4", "on_round_end@4"]
    assert complete_checkpoints(out) == [] and (out / "final" / "model.safetensors").is_file()
