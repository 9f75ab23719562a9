"""Optimizer parameter groups and LR schedules."""
import math

import pytest
from helpers import tiny_student

from pipeline.config import OptimConfig
from pipeline.student.step import build_optimizer, lr_lambda


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


def test_moe_aux_loss_is_added_with_its_coefficient():
    import torch
    from helpers import synthetic_records
    from transformers import AutoModelForCausalLM, MixtralConfig

    from pipeline.config import LossConfig
    from pipeline.data.batch import collate
    from pipeline.student.step import Trainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2))
    batch = collate(synthetic_records(3, 64, 4, seed=5))
    sums = {}
    for coef in (0.0, 0.1):
        t = Trainer(model, None, None, LossConfig(alpha=0.5, aux_loss_coef=coef), None, torch.device("cpu"))
        sums[coef] = t._loss(batch).loss_sum.item()
    aux = model(input_ids=batch.input_ids, output_router_logits=True).aux_loss.item()
    assert sums[0.1] - sums[0.0] == pytest.approx(0.1 * aux * batch.n_valid, rel=1e-4)
    with pytest.raises(ValueError, match="aux_loss"):
        Trainer(tiny_student(64), None, None, LossConfig(aux_loss_coef=0.1), None, torch.device("cpu"))._loss(batch)


def test_student_with_padded_output_layer_equals_unpadded():
    """A student whose (tied) embedding has 7 extra rows gets its logits sliced to the data's V:
    same loss and same gradients on the real rows as the unpadded student."""
    import torch
    from helpers import synthetic_records

    from pipeline.config import LossConfig
    from pipeline.data.batch import collate
    from pipeline.student.step import Trainer

    V = 64
    small, padded = tiny_student(V), tiny_student(V + 7)
    with torch.no_grad():
        for (name, p), q in zip(small.named_parameters(), padded.parameters()):
            q[: p.shape[0]].copy_(p) if "embed" in name else q.copy_(p)
    batch = collate(synthetic_records(3, V, 4, seed=5))
    cfg = LossConfig(alpha=0.5)
    a = Trainer(small, None, None, cfg, None, torch.device("cpu"))._loss(batch).loss_sum
    b = Trainer(padded, None, None, cfg, None, torch.device("cpu"), vocab_size=V)._loss(batch).loss_sum
    assert b.item() == pytest.approx(a.item(), rel=1e-6)
    a.backward()
    b.backward()
    ga, gb = small.get_input_embeddings().weight.grad, padded.get_input_embeddings().weight.grad
    torch.testing.assert_close(gb[:V], ga, rtol=1e-5, atol=1e-7)
    assert gb[V:].abs().max() == 0  # padding rows are never predicted nor input


def test_packing_probe_accepts_segment_attention_and_refuses_crossing_attention():
    import torch

    from pipeline.config import LossConfig
    from pipeline.student.step import Trainer, check_packing

    model = tiny_student(64)
    trainer = Trainer(model, None, None, LossConfig(alpha=0.5), None, torch.device("cpu"), packing=True)
    assert model.config._attn_implementation == "kd_segment_sdpa"
    check_packing(trainer, 64)  # one causal attention per packed sample: passes
    model.set_attn_implementation("sdpa")  # plain causal attention over the whole packed row
    with pytest.raises(ValueError, match="data.packing"):
        check_packing(trainer, 64)


def test_nonfinite_step_is_skipped_names_its_samples_and_leaves_the_weights():
    """A NaN in one input-embedding row (untied head) makes only the sample that contains that
    token non-finite: the step reports it by ID and leaves every weight and the AdamW state
    untouched; the next, clean step trains normally."""
    import torch
    from helpers import synthetic_records
    from transformers import AutoModelForCausalLM

    from pipeline.data.demo_corpus import llama_config
    from pipeline.config import LossConfig, OptimConfig
    from pipeline.data.batch import collate
    from pipeline.student.step import Trainer

    V = 64
    cfg = llama_config(V, 16, 2, 2, 1, 32)
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    recs = synthetic_records(4, V, 4, seed=3)
    for r in recs:
        r.input_ids[r.input_ids == V - 1] = V - 2
    recs[1].input_ids[1] = V - 1  # only sample s1 holds token V-1
    with torch.no_grad():
        model.model.embed_tokens.weight[V - 1] = float("nan")
    trainer = Trainer(model, build_optimizer(model, OptimConfig(lr=1e-2)), None, LossConfig(alpha=0.5), 1.0,
                      torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = trainer.train_step([collate(recs)])
    assert stats.nonfinite and stats.nonfinite_sample_ids == ["s1"]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) or (torch.isnan(p).any() and n.endswith("embed_tokens.weight")), n
    assert not trainer.optimizer.state  # AdamW never stepped
    stats = trainer.train_step([collate([recs[i] for i in (0, 2, 3)])])
    assert not stats.nonfinite and math.isfinite(stats.grad_norm)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"])
