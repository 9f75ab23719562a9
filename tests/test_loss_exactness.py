"""The loss of train-student against definitions computed from the teacher's own logits.

Every expected value here is computed inside the test from the full float64 logits of a tiny
teacher and of the student — ``p = softmax(z_teacher / τ)``, ``q = softmax(z_student / τ)`` —
never from the cached values through the project's formulas. The cache itself is written by
stage 1's own function (``fused_topk_targets``) at the cache temperature ``T_c``, and the loss
runs through ``Trainer.train_step`` (micro-batches, accumulation, one optimizer step), so both
stages are under test. A property-based grid (hypothesis) draws T_c, τ ∈ {0.5, 1, 2}, k (small
or the whole vocabulary), the tail mode, the divergence, α and the micro-batch / accumulation
split; a case the docs call inexact must be refused, naming both temperatures.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cache.records import CacheRecord
from pipeline.config import LossConfig
from pipeline.data.batch import LossTargets, collate
from pipeline.student.cross_tokenizer_loss import cross_tokenizer_loss
from pipeline.student.divergences import DIVERGENCES
from pipeline.student.step import Trainer
from pipeline.teacher.topk import fused_topk_targets

V, H, N_SAMPLES = 40, 16, 6
TEMPS = (0.5, 1.0, 2.0)
PARAMS = {"beta": 0.3, "skew": 0.2, "akl_mu": 0.5}


def _llama(seed: int, tied: bool):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                      intermediate_size=32, max_position_embeddings=64, tie_word_embeddings=tied, use_cache=False)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # logits of a few nats: a peaked teacher, so the tail matters
        model.get_output_embeddings().weight.mul_(8.0)
    return model


TEACHER = _llama(1, tied=False).double().eval().requires_grad_(False)
STUDENT = _llama(2, tied=True)
RNG = np.random.default_rng(0)
SAMPLES = []
for i in range(N_SAMPLES):
    T = int(RNG.integers(6, 14))
    SAMPLES.append((f"s{i}", RNG.integers(0, V, T).astype(np.int32), RNG.random(T) < 0.8))


@torch.no_grad()
def _teacher_logits(ids: np.ndarray) -> torch.Tensor:
    """(T, V) float64: the teacher's own ``forward().logits``."""
    return TEACHER(input_ids=torch.from_numpy(ids.astype(np.int64))[None]).logits[0]


def _cache(t_c: float, k: int) -> list[CacheRecord]:
    """The records stage 1 writes at cache temperature ``t_c``, top ``k`` (its own function,
    from the teacher's final hidden states and output layer)."""
    out = []
    W = TEACHER.get_output_embeddings().weight
    for sid, ids, mask in SAMPLES:
        x = torch.from_numpy(ids.astype(np.int64))[None]
        with torch.no_grad():
            hidden = TEACHER.model(input_ids=x).last_hidden_state[0].float()  # (T, H)
        rows = torch.arange(len(ids) - 1)
        top, vals, tail, _ = fused_topk_targets([hidden], [(W.float(), None)], [1.0], rows,
                                                torch.from_numpy(ids[1:].astype(np.int64)), k, t_c)
        out.append(CacheRecord(sid, ids, mask, top.numpy(), vals.numpy(), tail.numpy(), 0.0))
    return out


def _categories(p: torch.Tensor, q: torch.Tensor, S: torch.Tensor, tail: str):
    """The loss's categories (DESIGN.md, Divergences): the teacher's support ``S`` plus one tail
    outcome (``bucket``), or ``S`` renormalised on both sides (``renormalize``); categories of
    teacher mass 0 left out. Returns (P, Q) float64 vectors."""
    pS, qS = p[S], q[S]
    if tail == "renormalize":
        return pS / pS.sum(), qS / qS.sum()
    P, Q = torch.cat([pS, (1 - pS.sum()).reshape(1)]), torch.cat([qS, (1 - qS.sum()).reshape(1)])
    keep = P > 1e-12
    return P[keep], Q[keep]


def _kl(a, b):
    return (a * (a.log() - b.log())).sum()


def _divergence(P: torch.Tensor, Q: torch.Tensor, name: str) -> torch.Tensor:
    """``D(P, Q)`` written from the definitions (pipeline/student/divergences.py's table)."""
    if name == "forward_kl":
        return _kl(P, Q)
    if name == "reverse_kl":
        return _kl(Q, P)
    if name == "jsd":
        b = PARAMS["beta"]
        M = b * P + (1 - b) * Q
        return b * _kl(P, M) + (1 - b) * _kl(Q, M)
    if name == "skew_forward_kl":
        return _kl(P, PARAMS["skew"] * P + (1 - PARAMS["skew"]) * Q)
    if name == "skew_reverse_kl":
        return _kl(Q, PARAMS["skew"] * Q + (1 - PARAMS["skew"]) * P)
    if name == "tvd":
        return 0.5 * (P - Q).abs().sum()
    order = torch.argsort(P.detach(), descending=True, stable=True)  # akl: Wu et al. 2024
    ps, gap = P[order].detach(), (P - Q).abs()[order].detach()
    head = ps.cumsum(0) <= PARAMS["akl_mu"]
    head[0] = True
    gh, gt = gap[head].sum(), gap[~head].sum()
    return gh / (gh + gt) * _kl(P, Q) + gt / (gh + gt) * _kl(Q, P)


def _reference(student, alpha: float, tau: float, k: int, tail: str, div: str):
    """(loss_sum, ce_sum, kl_sum, d_sum, N) over all samples, float64, with autograd on the
    student; every term from the two models' full logits."""
    loss = ce_t = kl_t = d_t = 0.0
    n = 0
    for _, ids, mask in SAMPLES:
        zt = _teacher_logits(ids)
        zs = student(input_ids=torch.from_numpy(ids.astype(np.int64))[None]).logits[0]
        for t in range(len(ids) - 1):
            if not mask[t + 1]:
                continue
            n += 1
            y = int(ids[t + 1])
            ce = -F.log_softmax(zs[t], -1)[y]
            p, q = torch.softmax(zt[t] / tau, -1), torch.softmax(zs[t] / tau, -1)
            S = torch.topk(zt[t], k).indices  # the top-k ids are the same at every temperature
            if tail == "renormalize":  # forward KL keeps the student's full-vocabulary q (its docs)
                pS = p[S] / p[S].sum()
                kl = (pS * (pS.log() - q[S].log())).sum()
            else:
                kl = _divergence(*_categories(p, q, S, tail), "forward_kl")
            d = kl if div == "forward_kl" else _divergence(*_categories(p, q, S, tail), div)
            loss = loss + alpha * ce + (1 - alpha) * tau**2 * d
            ce_t, kl_t, d_t = ce_t + ce.item(), kl_t + kl.item(), d_t + d.item()
    return loss, ce_t, kl_t, d_t, n


def _exact(tail: str, t_c: float, tau: float, k: int) -> bool:
    """Where the docs (docs/concepts/losses.md) call the mode exact."""
    return tail == "renormalize" or t_c == tau or k == V


@settings(max_examples=36, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(t_c=st.sampled_from(TEMPS), tau=st.sampled_from(TEMPS), full=st.booleans(),
       tail=st.sampled_from(["bucket", "renormalize"]), div=st.sampled_from(DIVERGENCES),
       alpha=st.sampled_from([0.0, 0.5]), micro=st.sampled_from([1, 2, 3, 6]))
def test_train_step_equals_the_definition_on_the_teachers_logits(t_c, tau, full, tail, div, alpha, micro):
    k = V if full else 5
    records = _cache(t_c, k)
    student = copy.deepcopy(STUDENT)
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    cfg = LossConfig(alpha=alpha, temperature=tau, tail=tail, divergence=div, **PARAMS)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = Trainer(student, opt, None, cfg, None, torch.device("cpu"), cache_temperature=t_c)
    micro_batches = [collate(records[i: i + micro]) for i in range(0, N_SAMPLES, micro)]
    if not _exact(tail, t_c, tau, k):
        with pytest.raises(ValueError, match=f"loss.temperature={tau} differs from the cache temperature {t_c}"):
            trainer.train_step(micro_batches)
        return
    stats = trainer.train_step(micro_batches)
    ref_model = copy.deepcopy(STUDENT).double()
    loss, ce, kl, d, n = _reference(ref_model, alpha, tau, k, tail, div)
    (loss / n).backward()
    assert stats.n_tokens == n
    assert stats.ce == pytest.approx(ce / n, rel=1e-5)
    assert stats.kl == pytest.approx(kl / n, rel=2e-4, abs=1e-6)  # float32 cache values
    assert stats.distill == pytest.approx(d / n, rel=2e-4, abs=1e-6)
    assert stats.loss == pytest.approx(loss.item() / n, rel=2e-4, abs=1e-6)
    # one SGD step at lr 1: the update is minus the gradient of Σ loss_sum / N
    for (name, p), q in zip(student.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close((before[name] - p.detach()).double(), q.grad, rtol=2e-3, atol=2e-5, msg=name)


@pytest.mark.parametrize("t_c,tau", [(1.0, 1.0), (2.0, 2.0), (0.5, 0.5), (1.0, 2.0)])
def test_cross_tokenizer_loss_with_one_tokenizer_equals_the_bucket_definition(t_c, tau):
    """gold with identical tokenizers (every position aligned, every id mapped) is the bucket
    KL of the definition at τ = T_c, and refused at another τ."""
    k = 5
    records = _cache(t_c, k)
    b = collate(records)
    tg = b.targets()
    aligned = torch.ones_like(tg.labels, dtype=torch.bool)
    targets = LossTargets(tg.labels, tg.sample_index, tg.n_samples, tg.topk_ids, tg.topk_logprobs, tg.tail_logprob,
                          aligned, torch.ones_like(tg.topk_ids, dtype=torch.bool))
    student = copy.deepcopy(STUDENT).double()
    hidden = student.model(input_ids=b.input_ids).last_hidden_state
    h = hidden.reshape(-1, H).index_select(0, b.rows)
    W = student.get_output_embeddings().weight
    if t_c != tau:
        with pytest.raises(ValueError, match=f"loss.temperature={tau} differs from the cache temperature {t_c}"):
            cross_tokenizer_loss(h, W, None, targets, alpha=0.0, temperature=tau, cache_temperature=t_c)
        return
    out = cross_tokenizer_loss(h, W, None, targets, alpha=0.0, temperature=tau, cache_temperature=t_c)
    _, _, kl, _, n = _reference(copy.deepcopy(STUDENT).double(), 0.0, tau, k, "bucket", "forward_kl")
    assert out.kl_sum.sum().item() == pytest.approx(kl, rel=2e-4)
    assert out.loss_sum.item() == pytest.approx(tau**2 * kl, rel=2e-4)
