"""Sum-reduced CE and sparse KL (DESIGN.md, Loss).

For student logits ``z_t`` (vocab V), training temperature ``τ`` and teacher support ``S_t``
(the cached ids; ``-inf`` padding slots of sampled caches are excluded everywhere)::

    CE_t = -log_softmax(z_t)[y_t]
    KL_t = Σ_{i∈S_t} p_t(i) (log p_t(i) - log q_t(i)) [+ p_tail (log p_tail - log q_tail)]
    loss_sum = α Σ_t CE_t + (1-α) τ² Σ_t KL_t          (sums over valid positions)

with ``log q_t = log_softmax(z_t / τ)`` over the full vocabulary. The ``τ²`` factor keeps the
gradient scale independent of τ (Hinton et al., "Distilling the Knowledge in a Neural
Network", 2015, §2). Tail modes:

* ``renormalize``: ``p_t = softmax(log p^teacher_S / τ)`` over the support only; the tail mass
  is dropped. Exact KL(p_S || q) restricted to S with an unnormalised ``q``; biased towards an
  over-confident student when the top-k mass is small (Anshumann et al., ACL 2025).
* ``bucket`` (default): the teacher's tail mass is one extra outcome,
  ``q_tail = 1 - Σ_{i∈S} q_t(i)``, so the student is also taught how much mass to leave
  outside the support. Equals the dense KL when S is the whole vocabulary. At ``τ`` equal to
  the cache temperature it is exact KL between the (k+1)-outcome coarsenings of p and q; at
  other ``τ`` the bucket is re-tempered as if it were one token (an approximation).
* ``sampled``: for ``sampled`` / ``topk+sampled`` caches, whose values are an estimate ``p̂``
  of the whole teacher distribution (pipeline/targets.py): ``KL_t = Σ_{i∈S_t} p̂(i) (log p̂(i)
  - log q_t(i))`` with no renormalisation and no tail bucket. Its gradient
  ``-Σ_i p̂(i) ∇log q_t(i)`` is linear in ``p̂`` and ``E[p̂] = p``, so it is an unbiased
  estimate of ``∇ KL(p || q)`` (Anshumann et al., "Sparse Logit Sampling", ACL 2025, §3) at
  ``τ`` equal to the cache temperature. ``p̂`` is never re-tempered (a sampled estimate of
  ``p`` gives none of ``p^(1/τ)``): at another ``τ`` the student's ``q_τ`` is fitted to the
  cache-temperature distribution. The KL value itself is a biased, noisy estimate (``Σ p̂ log p̂``
  is not ``Σ p log p``); only its gradient is unbiased.

Temperature, in short: every mode is exact at ``τ`` = the cache temperature. ``renormalize``
re-tempers the support exactly (``p_S^(1/τ)`` renormalised) but ignores the tail; ``bucket``
approximates the tail at other ``τ``; ``sampled`` keeps the cache-temperature target.

The function returns sums and counts; the trainer divides once by the global valid-token count.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.teacher import log1mexp


AUTO_CHUNK_BYTES = 256 * 2**20  # float32 (chunk, V) logits per chunk when chunk_size=0
TAIL_MODES = ("renormalize", "bucket", "sampled")


def check_tail_mode(tail: str, target_type: str, temperature: float, cache_temperature: float) -> list[str]:
    """Refuse loss/cache pairs that bias the student; return warnings for inexact ones.

    * ``sampled`` on a ``topk`` cache: refused. Without renormalisation its optimum is the
      renormalised top-k scaled by the top-k mass (the ``renormalize`` bias, less clearly).
    * ``bucket`` on a sampled cache: refused. The estimate already covers the tail, so the true
      tail mass would be counted twice.
    * ``renormalize`` on a sampled cache: allowed (the values already sum to 1, so at
      ``τ`` = cache temperature it equals ``sampled``); warned at another ``τ``, where
      re-tempering an estimate is biased.
    * ``sampled`` at ``τ`` ≠ cache temperature: warned (the target stays at the cache temperature).

    Returns:
        Warning messages (empty when the pair is exact).
    Raises:
        ValueError: a refused pair, naming ``loss.tail`` and the cache's ``target_type``.
    """
    if tail not in TAIL_MODES:
        raise ValueError(f"loss.tail must be one of {TAIL_MODES}, got {tail!r}")
    sampled_cache = target_type != "topk"
    if tail == "sampled" and not sampled_cache:
        raise ValueError("loss.tail=sampled needs a cache with targets.type sampled or topk+sampled; "
                         "this train cache is topk (use loss.tail=bucket or renormalize)")
    if tail == "bucket" and sampled_cache:
        raise ValueError(f"loss.tail=bucket on a {target_type} cache counts the tail twice "
                         "(the sampled values already estimate it); use loss.tail=sampled")
    warns = []
    if sampled_cache and temperature != cache_temperature:
        warns.append(f"loss.temperature={temperature} differs from the cache temperature {cache_temperature}: with "
                     f"loss.tail={tail} on a {target_type} cache the target is only exact at the cache temperature")
    return warns


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


def sparse_kl(log_q: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, tail_logprob: torch.Tensor,
              temperature: float, tail: str) -> torch.Tensor:
    """Per-position KL(p || q) over the teacher's sparse support (module docstring formulas).

    Args:
        log_q: (N, V) float32 student ``log_softmax(z / τ)``.
        topk_ids: (N, k) int64 teacher support.
        topk_logprobs: (N, k) float32 teacher log-probabilities (or, for sampled caches, log
            estimated probabilities) at the cache temperature; ``-inf`` = padding slot.
        tail_logprob: (N,) float32 teacher tail log-mass (``-inf`` allowed).
        tail: ``renormalize``, ``bucket`` or ``sampled``.
    Returns:
        (N,) float32 KL in nats.
    """
    log_q_s = log_q.gather(-1, topk_ids)  # (N, k)
    if tail == "sampled":  # no re-tempering, no renormalisation, no bucket (module docstring)
        return _weighted_log_ratio(topk_logprobs, log_q_s).sum(-1)
    lp = topk_logprobs / temperature
    if tail == "renormalize":
        log_p = lp - torch.logsumexp(lp, dim=-1, keepdim=True)
        return _weighted_log_ratio(log_p, log_q_s).sum(-1)
    lt = tail_logprob / temperature  # (N,)
    z = torch.logsumexp(torch.cat([lp, lt[:, None]], dim=-1), dim=-1)  # (N,)
    log_p = lp - z[:, None]
    log_p_tail = lt - z
    p_tail = log_p_tail.exp()
    # q_tail = 1 - Σ_S q; clamp so a student with all its mass on S gives a finite log.
    log_q_s_live = torch.where(torch.isneginf(lp), -torch.inf, log_q_s)
    log_q_tail = log1mexp(torch.logsumexp(log_q_s_live, dim=-1).clamp(max=-1e-6))
    tail_term = torch.where(p_tail > 0, p_tail * (torch.where(p_tail > 0, log_p_tail, 0.0) - log_q_tail), 0.0)
    return _weighted_log_ratio(log_p, log_q_s).sum(-1) + tail_term


def _chunk_terms(z: torch.Tensor, y: torch.Tensor, topk_ids, topk_logprobs, tail_logprob,
                 temperature: float, tail: str, with_kl: bool) -> tuple[torch.Tensor, torch.Tensor]:
    log_q1 = F.log_softmax(z.float(), dim=-1)  # (n, V)
    ce = -log_q1.gather(-1, y[:, None]).squeeze(-1)
    if not with_kl:
        return ce, torch.zeros_like(ce)
    log_qt = log_q1 if temperature == 1.0 else F.log_softmax(z.float() / temperature, dim=-1)
    return ce, sparse_kl(log_qt, topk_ids, topk_logprobs, tail_logprob, temperature, tail)


def distill_loss(logits: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor, *, alpha: float,
                 temperature: float = 1.0, tail: str = "bucket", topk_ids: torch.Tensor | None = None,
                 topk_logprobs: torch.Tensor | None = None, tail_logprob: torch.Tensor | None = None,
                 chunk_size: int = 0) -> LossSums:
    """Hybrid sum-reduced loss over the valid positions of a batch.

    Valid positions are gathered first, then processed ``chunk_size`` at a time; each chunk's
    log-softmax is recomputed in the backward pass (activation checkpointing), so the float32
    ``(chunk, V)`` temporaries exist for one chunk at a time and the sparse targets are
    gathered, never densified to V.

    Args:
        logits: (B, T, V) student logits (any float dtype).
        input_ids: (B, T) int64; position t's target is ``input_ids[:, t+1]``.
        valid: (B, T-1) bool valid positions (``loss_mask[:, 1:]`` and not padding).
        alpha: CE weight in [0, 1]; the teacher tensors may be None when ``alpha == 1``.
        topk_ids: (B, T-1, k) int64; topk_logprobs: (B, T-1, k) float32; tail_logprob: (B, T-1).
    Returns:
        :class:`LossSums`.
    Raises:
        ValueError: ``alpha < 1`` without teacher targets.
    """
    B, T, V = logits.shape
    if chunk_size <= 0:
        chunk_size = max(1, AUTO_CHUNK_BYTES // (4 * V))
    with_kl = alpha < 1.0
    if with_kl and (topk_ids is None or topk_logprobs is None or tail_logprob is None):
        raise ValueError("alpha < 1 needs teacher targets (topk_ids, topk_logprobs, tail_logprob)")
    b_idx, t_idx = valid.nonzero(as_tuple=True)  # (N,), (N,)
    flat_logits = logits.reshape(B * T, V)
    rows = b_idx * T + t_idx
    y = input_ids[b_idx, t_idx + 1]
    ce_parts, kl_parts, agree_parts = [], [], []
    for s in range(0, rows.numel(), chunk_size):
        sl = slice(s, s + chunk_size)
        z = flat_logits[rows[sl]]  # (n, V)
        teacher = (topk_ids[b_idx[sl], t_idx[sl]], topk_logprobs[b_idx[sl], t_idx[sl]].float(),
                   tail_logprob[b_idx[sl], t_idx[sl]].float()) if with_kl else (None, None, None)
        args = (z, y[sl], *teacher, temperature, tail, with_kl)
        if rows.numel() > chunk_size and torch.is_grad_enabled():
            ce, kl = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            ce, kl = _chunk_terms(*args)
        ce_parts.append(ce)
        kl_parts.append(kl)
        if with_kl:
            with torch.no_grad():
                agree_parts.append(z.argmax(-1) == teacher[0][:, 0])
    ce = torch.cat(ce_parts) if ce_parts else logits.new_zeros(0, dtype=torch.float32)
    kl = torch.cat(kl_parts) if kl_parts else torch.zeros_like(ce)
    loss_sum = alpha * ce.sum() + ((1.0 - alpha) * temperature**2) * kl.sum() if with_kl else ce.sum()
    if rows.numel() == 0:
        loss_sum = loss_sum + 0.0 * logits.sum()  # keep the graph connected for empty batches

    def per_sample(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(B, dtype=dtype, device=logits.device).index_add_(0, b_idx, x.detach().to(dtype))

    agree = torch.cat(agree_parts) if agree_parts else torch.zeros_like(ce, dtype=torch.bool)
    return LossSums(loss_sum, per_sample(ce), per_sample(kl), valid.sum(-1).to(torch.int64),
                    per_sample(agree, torch.int64))
