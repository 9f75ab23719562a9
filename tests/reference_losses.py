"""Dense, obviously-correct references of the sparse losses (the pre-fusion implementation).

Kept for the tests only: the training path is ``pipeline.student.losses.fused_linear_loss``, which must
equal these in values and gradients. Formulas: pipeline/student/losses.py's module docstring.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.numerics import log1mexp


def _weighted_log_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Elementwise ``p (log p - log q)`` with ``0`` where ``p = 0`` (``-inf`` padding slots)."""
    live = ~torch.isneginf(log_p)
    safe = torch.where(live, log_p, 0.0)
    return torch.where(live, safe.exp() * (safe - log_q), 0.0)


@dataclass
class LossSums:
    """Per-batch loss terms.

    Attributes:
        loss_sum: scalar float32 with grad, ``α Σ CE + (1-α) τ² Σ KL`` over valid positions.
        ce_sum, kl_sum: (B,) float32 per-sample sums (nats), detached.
        n_tokens: (B,) int64 valid positions per sample.
        top1_agree: (B,) int64 positions where the student's argmax equals the teacher's top-1.
    """

    loss_sum: torch.Tensor
    ce_sum: torch.Tensor
    kl_sum: torch.Tensor
    n_tokens: torch.Tensor
    top1_agree: torch.Tensor


def _retemper(topk_logprobs, tail_logprob, temperature, cache_temperature, tail):
    """Cached values at ``T_c`` → the teacher's log-probabilities at τ on the cached ids (times
    ``T_c / τ``) and the tail; a bucket at ``τ ≠ T_c`` needs the full vocabulary (tail dropped)."""
    ratio = cache_temperature / temperature
    lp = topk_logprobs * ratio
    if tail == "bucket" and ratio != 1.0:
        return lp, torch.full_like(tail_logprob, -torch.inf)
    return lp, tail_logprob


def sparse_kl(log_q: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor,
              temperature: float, tail: str, cache_temperature: float = 1.0) -> torch.Tensor:
    """Per-position KL(p || q) over the teacher's sparse support (module docstring formulas).

    Args:
        log_q: (N, V) float32 student ``log_softmax(z / τ)``.
        topk_ids: (N, k) int64 teacher support.
        topk_logprobs: (N, k) float32 teacher log-probabilities (or, for sampled caches, log
            estimated probabilities) at the cache temperature; ``-inf`` = padding slot.
        tail_logprob: (N,) float32 teacher tail log-mass (``-inf`` allowed).
        tail: ``renormalize``, ``bucket`` or ``sampled``.
        cache_temperature: ``T_c`` of the cached values (re-tempered by ``T_c / τ``).
    Returns:
        (N,) float32 KL in nats.
    """
    log_q_s = log_q.gather(-1, topk_ids)  # (N, k)
    if tail == "sampled":  # no re-tempering, no renormalisation, no bucket (module docstring)
        return _weighted_log_ratio(topk_logprobs, log_q_s).sum(-1)
    lp, lt = _retemper(topk_logprobs, tail_logprob, temperature, cache_temperature, tail)
    if tail == "renormalize":
        log_p = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
        return _weighted_log_ratio(log_p, log_q_s).sum(-1)
    z = torch.logsumexp(torch.cat([lp, lt[:, None]], dim=-1), dim=-1)  # (N,)
    log_p = lp - z[:, None]
    log_p_tail = lt - z
    p_tail = log_p_tail.exp()
    # q_tail = 1 - Σ_S q; clamp so a student with all its mass on S gives a finite log.
    log_q_s_live = torch.where(torch.isneginf(lp), -torch.inf, log_q_s)
    log_q_tail = log1mexp(torch.logsumexp(log_q_s_live, dim=-1).clamp(max=-1e-6))
    tail_term = torch.where(p_tail > 0, p_tail * (torch.where(p_tail > 0, log_p_tail, 0.0) - log_q_tail), 0.0)
    return _weighted_log_ratio(log_p, log_q_s).sum(-1) + tail_term


def distill_loss(logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor, *, alpha: float,
                 temperature: float = 1.0, tail: str = "bucket", topk_ids=None, topk_logprobs=None,
                 tail_logprob=None, cache_temperature: float = 1.0) -> LossSums:
    """Dense reference of the hybrid loss from full (B, T, V) logits (no chunking, autograd).

    Args:
        logits: (B, T, V); input_ids: (B, T); valid: (B, T-1) bool; teacher tensors (B, T-1, k).
    """
    B, T, V = logits.shape
    if alpha < 1.0 and topk_ids is None:
        raise ValueError("alpha < 1 needs teacher targets (topk_ids, topk_logprobs, tail_logprob)")
    b_idx, t_idx = valid.nonzero(as_tuple=True)
    z = logits[b_idx, t_idx]  # (N, V)
    y = input_ids[b_idx, t_idx + 1]
    log_q1 = F.log_softmax(z.double(), -1)
    ce = -log_q1.gather(-1, y[:, None]).squeeze(-1)
    if alpha < 1.0:
        log_qt = F.log_softmax(z.double() / temperature, -1)
        ids = topk_ids[b_idx, t_idx]
        kl = sparse_kl(log_qt, ids, topk_logprobs[b_idx, t_idx].double(), tail_logprob[b_idx, t_idx].double(),
                       temperature, tail, cache_temperature)
        agree = z.argmax(-1) == ids[:, 0]
        loss_sum = alpha * ce.sum() + (1.0 - alpha) * temperature**2 * kl.sum()
    else:
        kl, agree, loss_sum = torch.zeros_like(ce), torch.zeros_like(ce, dtype=torch.bool), ce.sum()

    def per_sample(x, dtype=torch.float64):
        return torch.zeros(B, dtype=dtype).index_add_(0, b_idx, x.detach().to(dtype))

    return LossSums(loss_sum, per_sample(ce), per_sample(kl), valid.sum(-1).to(torch.int64),
                    per_sample(agree, torch.int64))


def padded_targets(records, T: int) -> tuple[torch.Tensor, dict]:
    """The (B, T−1) layout :func:`distill_loss` takes, from cache records padded to length ``T``:
    ``valid`` (B, T−1) bool (position t is valid iff ``loss_mask[t+1]``, DESIGN.md) and the teacher
    tensors ``{topk_ids (B, T−1, k) int64, topk_logprobs (B, T−1, k), tail_logprob (B, T−1)}``."""
    B, k = len(records), records[0].topk_ids.shape[-1]
    valid = torch.zeros(B, T - 1, dtype=torch.bool)
    ids, lp, tail = torch.zeros(B, T - 1, k, dtype=torch.long), torch.zeros(B, T - 1, k), torch.zeros(B, T - 1)
    for i, r in enumerate(records):
        n = len(r.input_ids)
        valid[i, : n - 1] = torch.from_numpy(r.loss_mask[1:])
        ids[i, : n - 1], lp[i, : n - 1] = torch.from_numpy(r.topk_ids).long(), torch.from_numpy(r.topk_logprobs)
        tail[i, : n - 1] = torch.from_numpy(r.tail_logprob)
    return valid, {"topk_ids": ids, "topk_logprobs": lp, "tail_logprob": tail}


def fused_from_logits(logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor, *, alpha: float,
                      temperature: float = 1.0, tail: str = "bucket", topk_ids=None, topk_logprobs=None,
                      tail_logprob=None, chunk_size: int = 0, cache_temperature: float = 1.0) -> LossSums:
    """The product's fused loss driven by given (B, T, V) logits: the valid rows are the hidden
    states and the output projection is the identity (V, V), so ``z = logits`` exactly.
    Same signature and result as :func:`distill_loss`; gradients flow to ``logits``."""
    from pipeline.data.batch import LossTargets

    from pipeline.student.losses import fused_linear_loss
    B, T, V = logits.shape
    b_idx, t_idx = valid.nonzero(as_tuple=True)
    teacher = {}
    if topk_ids is not None:
        teacher = dict(topk_ids=topk_ids[b_idx, t_idx].long(), topk_logprobs=topk_logprobs[b_idx, t_idx],
                       tail_logprob=tail_logprob[b_idx, t_idx])
    tg = LossTargets(input_ids[b_idx, t_idx + 1], b_idx, B, **teacher)
    eye = torch.eye(V, dtype=logits.dtype)
    out = fused_linear_loss(logits[b_idx, t_idx], eye, None, tg, alpha=alpha, temperature=temperature, tail=tail,
                            chunk_size=chunk_size, cache_temperature=cache_temperature)
    return LossSums(out.loss_sum, out.ce_sum, out.kl_sum, valid.sum(-1).to(torch.int64), out.top1_agree)


def sparse_divergence(log_q: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                      tail_logprob: torch.Tensor, temperature: float, tail: str, divergence: str, beta: float = 0.5,
                      skew: float = 0.1, akl_mu: float = 0.5, cache_temperature: float = 1.0) -> torch.Tensor:
    """Per-position divergence ``D(p, q)`` over the tail mode's categories, written out from
    its definition (pipeline/student/divergences.py) for autograd: the cached ids plus one tail
    outcome (``bucket``) or the cached ids renormalised on both sides (``renormalize``);
    categories with teacher probability 0 left out.

    Args: as :func:`sparse_kl`; ``divergence`` and its parameters as ``loss.*``.
    Returns:
        (N,) D in nats, differentiable with respect to ``log_q``.
    """
    live = ~torch.isneginf(topk_logprobs)
    log_q_s = torch.where(live, log_q.gather(-1, topk_ids), -torch.inf)
    lp, lt = _retemper(topk_logprobs, tail_logprob, temperature, cache_temperature, tail)
    if tail == "renormalize":
        log_p = lp - torch.logsumexp(lp, -1, keepdim=True)
        log_qc = log_q_s - torch.logsumexp(log_q_s, -1, keepdim=True)
    else:
        z = torch.logsumexp(torch.cat([lp, lt[:, None]], -1), -1)
        log_p = torch.cat([lp - z[:, None], (lt - z)[:, None]], -1)
        log_q_tail = log1mexp(torch.logsumexp(log_q_s, -1).clamp(max=-1e-6))
        log_qc = torch.cat([log_q_s, log_q_tail[:, None]], -1)
        live = torch.cat([live, ~torch.isneginf(lt)[:, None]], -1)
    P = torch.where(live, torch.where(live, log_p, 0.0).exp(), 0.0)
    Q = torch.where(live, torch.where(live, log_qc, 0.0).exp(), 0.0)

    def log(x):  # log on the live categories, 0 elsewhere (multiplied by 0 there)
        return torch.where(live, torch.log(torch.where(live, x, 1.0)), 0.0)

    def kl(a, b):
        return (a * (log(a) - log(b))).sum(-1)

    if divergence == "forward_kl":
        return kl(P, Q)
    if divergence == "reverse_kl":
        return kl(Q, P)
    if divergence == "jsd":
        M = beta * P + (1 - beta) * Q
        return beta * kl(P, M) + (1 - beta) * kl(Q, M)
    if divergence == "skew_forward_kl":
        return kl(P, skew * P + (1 - skew) * Q)
    if divergence == "skew_reverse_kl":
        return kl(Q, skew * Q + (1 - skew) * P)
    if divergence == "tvd":
        return 0.5 * (P - Q).abs().sum(-1)
    assert divergence == "akl"
    Pd, Qd = P.detach(), Q.detach()  # the authors' ratios: no gradient through the weights
    ps, order = Pd.sort(dim=-1, descending=True, stable=True)
    gap = (ps - Qd.gather(-1, order)).abs()
    head = ps.cumsum(-1) <= akl_mu
    head[:, 0] = True
    g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
    denom = (g_head + g_tail).clamp(min=1e-12)
    return g_head / denom * kl(P, Q) + g_tail / denom * kl(Q, P)
