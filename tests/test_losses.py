"""The product's fused loss (driven by given logits) against dense, obviously-correct float64 references."""
import math

import pytest
import torch
import torch.nn.functional as F

from reference_losses import fused_from_logits as distill_loss
from reference_losses import sparse_kl
from reference_targets import topk_targets
from pipeline.numerics import log1mexp


def _setup(B=3, T=7, V=11, k=4, seed=0, cache_temperature=1.0):
    """Student logits, token ids, valid positions, the teacher's own logits (B, T, V) float64,
    and the cache written from them at ``cache_temperature`` (top-k of its log-softmax)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, V, (B, T), generator=g)
    valid = torch.rand(B, T - 1, generator=g) < 0.7
    tg = topk_targets(F.log_softmax(teacher / cache_temperature, -1), ids, k)
    return logits, ids, valid, teacher, tg


def _reference(logits, ids, valid, teacher, k, alpha, tau, tail):
    """Per-position loops, float64, straight from the definitions on the teacher's own logits:
    ``p = softmax(z_teacher / τ)`` on its top-k ids, renormalised over them (``renormalize``) or
    with the rest as one outcome (``bucket``); ``q = softmax(z_student / τ)``."""
    B, T, V = logits.shape
    ce_tot = kl_tot = 0.0
    for b in range(B):
        for t in range(T - 1):
            if not valid[b, t]:
                continue
            z = logits[b, t]
            ce_tot += -F.log_softmax(z, -1)[ids[b, t + 1]].item()
            logq = F.log_softmax(z / tau, -1)
            p_full = torch.softmax(teacher[b, t] / tau, -1)
            top = torch.topk(teacher[b, t], k).indices
            p = p_full[top]
            if tail == "renormalize":
                p = p / p.sum()
                kl = sum(p[i] * (math.log(p[i]) - logq[top[i]]) for i in range(k))
            else:
                pt = 1 - p.sum().item()
                qt = 1 - logq[top].exp().sum()
                kl = sum(p[i] * (math.log(p[i]) - logq[top[i]]) for i in range(k))
                if pt > 1e-12:
                    kl = kl + pt * (math.log(pt) - math.log(qt))
            kl_tot += float(kl)
    return ce_tot, kl_tot, alpha * ce_tot + (1 - alpha) * tau**2 * kl_tot


@pytest.mark.parametrize("tail,t_c,tau", [("renormalize", 1.0, 1.0), ("renormalize", 1.0, 2.0), ("renormalize", 2.0, 1.0),
                                          ("renormalize", 0.5, 2.0), ("bucket", 1.0, 1.0), ("bucket", 2.0, 2.0),
                                          ("bucket", 0.5, 0.5)])
def test_loss_matches_naive_reference(tail, t_c, tau):
    logits, ids, valid, teacher, tg = _setup(cache_temperature=t_c)
    out = distill_loss(logits, ids, valid, alpha=0.3, temperature=tau, tail=tail, topk_ids=tg.topk_ids.long(),
                       topk_logprobs=tg.topk_logprobs, tail_logprob=tg.tail_logprob, cache_temperature=t_c)
    ce, kl, total = _reference(logits, ids, valid, teacher, 4, 0.3, tau, tail)
    assert out.ce_sum.sum().item() == pytest.approx(ce, rel=1e-5)
    assert out.kl_sum.sum().item() == pytest.approx(kl, rel=1e-5)
    assert out.loss_sum.item() == pytest.approx(total, rel=1e-5)
    assert out.n_tokens.tolist() == valid.sum(-1).tolist()


@pytest.mark.parametrize("t_c,tau", [(1.0, 2.0), (2.0, 1.0), (2.0, 0.5)])
def test_bucket_at_another_temperature_is_exact_on_the_full_vocabulary_and_refused_on_top_k(t_c, tau):
    logits, ids, valid, teacher, tg = _setup(V=9, k=9, cache_temperature=t_c)
    out = distill_loss(logits, ids, valid, alpha=0.0, temperature=tau, tail="bucket", topk_ids=tg.topk_ids.long(),
                       topk_logprobs=tg.topk_logprobs, tail_logprob=tg.tail_logprob, cache_temperature=t_c)
    _, kl, _ = _reference(logits, ids, valid, teacher, 9, 0.0, tau, "bucket")
    assert out.kl_sum.sum().item() == pytest.approx(kl, rel=1e-6)
    logits, ids, valid, teacher, tg = _setup(cache_temperature=t_c)
    with pytest.raises(ValueError, match=f"loss.temperature={tau} differs from the cache temperature {t_c}"):
        distill_loss(logits, ids, valid, alpha=0.0, temperature=tau, tail="bucket", topk_ids=tg.topk_ids.long(),
                     topk_logprobs=tg.topk_logprobs, tail_logprob=tg.tail_logprob, cache_temperature=t_c)


def test_full_support_bucket_and_renormalize_equal_dense_kl():
    logits, ids, valid, teacher, tg = _setup(V=9, k=9)
    lp = F.log_softmax(teacher, -1)
    dense = (lp[:, :-1].exp() * (lp[:, :-1] - F.log_softmax(logits[:, :-1], -1))).sum(-1)[valid].sum()
    for tail in ("bucket", "renormalize"):
        out = distill_loss(logits, ids, valid, alpha=0.0, tail=tail, topk_ids=tg.topk_ids.long(),
                           topk_logprobs=tg.topk_logprobs, tail_logprob=tg.tail_logprob)
        assert out.kl_sum.sum().item() == pytest.approx(dense.item(), rel=1e-6, abs=1e-9)


def test_ce_only_matches_cross_entropy_and_needs_no_teacher():
    logits, ids, valid, _, _ = _setup()
    out = distill_loss(logits, ids, valid, alpha=1.0)
    ref = F.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid], reduction="sum")
    assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-6)  # float32 log-softmax
    with pytest.raises(ValueError, match="teacher targets"):
        distill_loss(logits, ids, valid, alpha=0.5)


def test_chunked_loss_and_gradient_equal_unchunked():
    logits, ids, valid, _, tg = _setup(B=4, T=9, V=13, cache_temperature=1.5)
    grads = []
    for chunk in (0, 3):
        z = logits.clone().requires_grad_(True)
        out = distill_loss(z, ids, valid, alpha=0.4, temperature=1.5, tail="bucket", topk_ids=tg.topk_ids.long(),
                           topk_logprobs=tg.topk_logprobs, tail_logprob=tg.tail_logprob, chunk_size=chunk,
                           cache_temperature=1.5)
        out.loss_sum.backward()
        grads.append((out.loss_sum.item(), z.grad.clone(), out.kl_sum.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1])
    torch.testing.assert_close(grads[0][2], grads[1][2])


def test_topk_targets_tail_and_sorting():
    _, ids, _, teacher, tg = _setup(k=4)
    lp = F.log_softmax(teacher, -1)
    assert (tg.topk_logprobs[..., :-1] >= tg.topk_logprobs[..., 1:]).all()
    mass = tg.topk_logprobs.exp().sum(-1) + tg.tail_logprob.exp()
    torch.testing.assert_close(mass, torch.ones_like(mass))
    torch.testing.assert_close(tg.target_logprob, lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1))


def test_log1mexp_is_stable():
    x = torch.tensor([-1e-20, -1e-5, -0.5, -1.0, -50.0, 0.0], dtype=torch.float64)
    ref = torch.tensor([math.log(-math.expm1(v)) if v < 0 else -math.inf for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), ref)


def test_sparse_kl_zero_when_student_equals_teacher_on_full_support():
    lp = F.log_softmax(torch.randn(5, 6, dtype=torch.float64), -1)
    vals, idx = torch.topk(lp, 6)
    kl = sparse_kl(lp, idx, vals, torch.full((5,), -math.inf, dtype=torch.float64), 1.0, "bucket")
    torch.testing.assert_close(kl, torch.zeros(5, dtype=torch.float64))
