"""Optimizer parameter groups and LR schedules."""
import pytest
from helpers import tiny_student

from pipeline.config import OptimConfig
from pipeline.trainer import build_optimizer, lr_lambda


def _group_of(opt, param):
    return next(g for g in opt.param_groups if any(p is param for p in g["params"]))


def test_param_groups_receive_their_learning_rates_and_no_decay_on_norms():
    model = tiny_student(64)
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, param_groups=[{"pattern": r"embed_tokens", "lr": 5e-3},
                                                                {"pattern": r"layers\.1\.", "lr": 2e-4, "weight_decay": 0.0}])
    opt = build_optimizer(model, cfg)
    emb = model.model.embed_tokens.weight
    assert _group_of(opt, emb)["lr"] == 5e-3 and _group_of(opt, emb)["weight_decay"] == 0.1
    l1 = model.model.layers[1].mlp.up_proj.weight
    assert _group_of(opt, l1)["lr"] == 2e-4 and _group_of(opt, l1)["weight_decay"] == 0.0
    l0 = model.model.layers[0].mlp.up_proj.weight
    assert _group_of(opt, l0)["lr"] == 1e-3 and _group_of(opt, l0)["weight_decay"] == 0.1
    for norm in (model.model.norm.weight, model.model.layers[0].input_layernorm.weight):
        assert _group_of(opt, norm)["weight_decay"] == 0.0
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="'nothing_matches'"):
        build_optimizer(model, OptimConfig(param_groups=[{"pattern": "nothing_matches"}]))


@pytest.mark.parametrize("schedule,end", [("cosine", 0.1), ("linear", 0.1), ("constant", 1.0)])
def test_schedules(schedule, end):
    f = lr_lambda(OptimConfig(warmup_steps=4, schedule=schedule, min_lr_ratio=0.1), max_steps=20)
    assert [round(f(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(end)
    assert all(f(s) >= f(s + 1) - 1e-12 for s in range(4, 20))
