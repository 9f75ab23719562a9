"""Soft-capped logits (Gemma 2's ``final_logit_softcapping``: ``logits = c · tanh(z / c)``) in both
stages, against a tiny Gemma2ForCausalLM's own ``forward().logits``: stage 1's targets equal their
float64 log-softmax, stage 2's fused loss (``Trainer._loss``, CE and KL) equals the dense loss on
them in value and in every parameter's gradient; a cap the fused path cannot apply is refused."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import synthetic_records

from pipeline.config import LossConfig
from pipeline.data.batch import collate
from pipeline.models import defer_output_projection
from pipeline.student.step import Trainer
from pipeline.teacher.topk import fused_topk_targets, output_head, position_logprobs
from reference_losses import distill_loss, padded_targets

V, CAP = 64, 5.0


def _gemma2(tied: bool, seed: int = 0):
    """A 2-layer Gemma 2 with ``final_logit_softcapping=5`` whose logits reach about ±15 (the
    output layer scaled up), so the cap changes them."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, max_position_embeddings=64, final_logit_softcapping=CAP,
                       tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(60.0)
    model.config.use_cache = False
    return model


def _raw_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's logits without the cap (the output layer on its final hidden states)."""
    h = model.model(input_ids=ids).last_hidden_state
    return model.get_output_embeddings()(h)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_stage1_targets_equal_the_capped_log_softmax(temperature):
    """``fused_topk_targets`` (several chunks) and ``position_logprobs`` of the deferred teacher
    equal the float64 log-softmax of the undeferred model's own logits at τ; the config keeps the
    cap outside the forward (what save_pretrained writes)."""
    model = _gemma2(tied=True)
    ref_model = copy.deepcopy(model).double()
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ref_model(input_ids=ids).logits  # (2, 13, V) float64, capped by the model itself
        raw = _raw_logits(ref_model, ids)
    assert logits.abs().max() < CAP and raw.abs().max() > 2 * CAP  # the cap bites
    ref_lp = F.log_softmax(logits / temperature, -1).flatten(0, 1)
    defer_output_projection(model)
    with torch.no_grad():
        hidden = model(input_ids=ids).logits.flatten(0, 1)  # (26, H): the deferred layer returns its input
    assert model.config.final_logit_softcapping == CAP and model.config.to_dict()["final_logit_softcapping"] == CAP
    heads = [output_head(model, V)]
    assert heads[0][2] == CAP
    rows = torch.cat([torch.arange(12), 13 + torch.arange(9)])
    next_ids = ids.flatten()[rows + 1]
    k = 6
    with torch.no_grad():  # as stage 1 runs it
        got_ids, got_vals, got_tail, got_target = fused_topk_targets([hidden], heads, [1.0], rows, next_ids, k,
                                                                     temperature, chunk_bytes=4 * V * 5)
        lp = position_logprobs([hidden], heads, [1.0], rows, temperature)
    want_vals, want_ids = ref_lp[rows].topk(k, -1)
    assert torch.equal(got_ids.long(), want_ids)
    torch.testing.assert_close(got_vals.double(), want_vals, atol=2e-5, rtol=0)
    want_tail = torch.log1p(-want_vals.exp().sum(-1))
    torch.testing.assert_close(got_tail.double(), want_tail, atol=2e-5, rtol=0)
    torch.testing.assert_close(got_target.double(), ref_lp[rows].gather(-1, next_ids[:, None]).squeeze(-1),
                               atol=2e-5, rtol=0)
    torch.testing.assert_close(lp.double(), ref_lp[rows], atol=2e-5, rtol=0)
    uncapped = F.log_softmax(raw / temperature, -1).flatten(0, 1)[rows]
    assert (uncapped.topk(k, -1).values - want_vals).abs().max() > 0.1  # ignoring the cap would show


@pytest.mark.parametrize("tied", [True, False])
def test_stage2_fused_loss_equals_the_dense_loss_of_the_capped_logits(tied):
    """``Trainer._loss`` (deferred output layer, fused loss with the head's cap; float32), CE and
    KL at τ = T_c = 2, equals the dense loss of the undeferred model's own (B, T, V) logits in
    float64: value, per-sample CE/KL, and every parameter's gradient to 1e-5 of its largest
    entry; the dense loss of the uncapped logits differs."""
    model = _gemma2(tied)
    dense_model = copy.deepcopy(model).double()
    recs = synthetic_records(4, V, 6, seed=2)
    batch = collate(recs)
    cfg = LossConfig(alpha=0.5, temperature=2.0, tail="bucket")
    trainer = Trainer(model, None, None, cfg, None, torch.device("cpu"), cache_temperature=2.0)
    assert trainer.head.softcap == CAP
    sums = trainer._loss(batch)
    sums.loss_sum.backward()
    valid, targets = padded_targets(recs, batch.input_ids.shape[1])
    teacher = dict(alpha=0.5, temperature=2.0, tail="bucket", cache_temperature=2.0, **targets)
    logits = dense_model(input_ids=batch.input_ids).logits
    assert logits.detach().abs().max() < CAP
    ref = distill_loss(logits, batch.input_ids, valid, **teacher)
    ref.loss_sum.backward()
    assert sums.loss_sum.item() == pytest.approx(ref.loss_sum.item(), rel=1e-5)
    torch.testing.assert_close(sums.ce_sum.double(), ref.ce_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums.kl_sum.double(), ref.kl_sum, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), dense_model.parameters()):
        scale = q.grad.abs().max().item()
        assert scale > 0 and (p.grad.double() - q.grad).abs().max().item() <= 1e-5 * scale, name
    with torch.no_grad():
        raw = distill_loss(_raw_logits(dense_model, batch.input_ids), batch.input_ids, valid, **teacher)
    assert abs(raw.loss_sum.item() - ref.loss_sum.item()) > 0.05 * ref.loss_sum.item()


def test_a_cap_the_fused_path_cannot_apply_is_refused():
    model = _gemma2(tied=True)
    model.config.final_logit_softcapping = -1.0
    with pytest.raises(ValueError, match=r"Gemma2ForCausalLM: final_logit_softcapping=-1.0 is not a positive number"):
        defer_output_projection(model)
