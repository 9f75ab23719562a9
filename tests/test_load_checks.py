"""A broken load stops the run: stage 1 checks every teacher on its first batch (uniform outputs;
perplexity >= V/2 unless ``teacher_check: warn``), stage 2 refuses a pretrained student whose
output layer is all zeros (pipeline/teacher/load_check.py, pipeline/models/head.py)."""
import math

import pytest
import torch
from arch_models import zero_output_layer
from conftest import precompute_config, run_cli, train_config, write_yaml

from pipeline.teacher.load_check import FirstBatch, check_first_batch, first_batch


def test_first_batch_numbers_against_the_formula():
    torch.manual_seed(0)
    hidden, w, b = torch.randn(10, 8), torch.randn(12, 8), torch.randn(12)
    rows, nxt = torch.tensor([0, 3, 4, 9]), torch.tensor([5, 0, 11, 2])
    got = first_batch(hidden, (w, b), rows, nxt)
    lp = torch.log_softmax(hidden.double()[rows] @ w.double().T + b.double(), -1)
    assert got.positions == 4 and not got.uniform
    assert math.isclose(got.nll_sum, float(-lp[torch.arange(4), nxt].sum()), rel_tol=1e-5)
    zero = first_batch(hidden, (torch.zeros(12, 8), None), rows, nxt)  # an output layer never filled
    assert zero.uniform and math.isclose(zero.nll_sum, 4 * math.log(12), rel_tol=1e-6)
    assert first_batch(hidden, (w, b), rows[:0], nxt[:0]) == FirstBatch()  # a padding call


def test_check_first_batch_threshold_and_uniform(capsys):
    V, n = 100, 50
    below = FirstBatch(n * math.log(V / 2) - 1e-3, n)  # perplexity just below V/2
    at = FirstBatch(n * math.log(V / 2) + 1e-3, n)
    check_first_batch([below], ["t"], V, "stop")
    with pytest.raises(ValueError, match=r"teacher t: perplexity 50\.0 on the first batch \(50 positions\) is >= V/2 = 50"):
        check_first_batch([at], ["t"], V, "stop")
    check_first_batch([at], ["t"], V, "warn")
    assert "warning: teacher t: perplexity 50.0" in capsys.readouterr().out
    uniform = FirstBatch(n * math.log(V), n, uniform=True)
    for mode in ("stop", "warn"):
        with pytest.raises(ValueError, match="teacher u: its outputs are uniform"):
            check_first_batch([below, uniform], ["t", "u"], V, mode)
    check_first_batch([FirstBatch()], ["t"], V, "stop")  # no position: nothing to judge


def test_stage1_stops_on_a_broken_or_random_teacher(assets, tmp_path):
    broken = zero_output_layer(assets["teacher"], tmp_path / "zero-head")
    for teacher, check, expect in ((broken, "warn", f"teacher {broken}: its outputs are uniform on the first batch"),
                                   (assets["teacher"], "stop", f"teacher {assets['teacher']}: perplexity")):
        cfg = precompute_config(assets, tmp_path / f"cache-{check}", teacher_check=check, tokenizer=assets["tokenizer"])
        cfg["teachers"] = [{"path": str(teacher)}]
        res = run_cli(["stages.precompute_teacher", "--config", str(write_yaml(tmp_path / f"{check}.yaml", cfg))])
        assert res.returncode == 2 and expect in res.stderr and res.stderr.count("\n") == 1, res.stderr[-2000:]
        assert not (tmp_path / f"cache-{check}" / "manifest.json").is_file() or '"complete": false' in \
            (tmp_path / f"cache-{check}" / "manifest.json").read_text()


def test_pretrained_student_with_a_zero_output_layer_is_refused(assets, caches, tmp_path):
    """(2 ranks: tests/test_architectures.py, test_zero_output_layer_student_refused_at_two_ranks.)"""
    student = zero_output_layer(assets["teacher"], tmp_path / "zero-head")
    cfg = train_config(assets, caches, tmp_path / "run", student={"path": str(student), "init": "pretrained"})
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-3000:]
    assert f"student {student}: its output layer ({assets['vocab']}, 32) is all zeros" in res.stderr, res.stderr[-3000:]
