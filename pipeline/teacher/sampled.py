"""Sparse teacher targets of three types: exact top-k, sampled, and exact head + sampled tail.

Every type fills the same fixed-width cache layout per position ``t``: ``ids[t, :k]`` and
``values[t, :k]`` sorted descending, plus ``tail_logprob[t]`` = log of the TRUE teacher mass
outside the stored ids (informational; computed in float32 with :func:`log1mexp`).

* ``topk``: the k most probable tokens, values = exact teacher log-probabilities
  (:func:`pipeline.teacher.topk.fused_topk_targets`). Renormalising them biases the student towards
  over-confidence (Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
  Distillation in LLMs", ACL 2025, §3).
* ``sampled`` (Anshumann et al. 2025, "Random Sampling KD"): ``N = num_draws`` tokens drawn
  with replacement from the teacher distribution ``p`` (at the cache temperature); the unique
  ids are stored with value ``log(c_i / N)`` (``c_i`` = count). ``p̂_i = c_i / N`` is an
  unbiased estimate of ``p_i`` for every token (``E[c_i] = N p_i``), so the CE against ``p̂``
  has an unbiased gradient for ``∇ KL(p || q)`` (pipeline/student/losses.py, ``tail: sampled``).
  With ``sample_temperature = s ≠ 1`` the draws come from the flattened proposal
  ``π ∝ p^(1/s)`` and the values are self-normalised importance weights
  ``p̂_i = c_i w_i / Σ_j c_j w_j``, ``w = p / π`` (Owen, "Monte Carlo theory, methods and
  examples", 2013, §9.2): biased by O(1/N) but consistent; only ``s = 1`` is exactly unbiased.
* ``topk+sampled``: the exact top ``head_k`` plus ``num_draws`` draws from ``p`` renormalised
  outside the head, value ``log(m_tail) + log(c_i / N)`` with ``m_tail`` the exact tail mass
  (the "top-k + tail" split of "Don't Ignore the Tail", 2026). The head is exact, the tail
  estimate is unbiased (at ``s = 1``); the stored values sum to 1.

Slot budget: the sampled part has ``slots`` slots (``k`` or ``k - head_k``). Unused trailing
slots are padding (value ``-inf``, id 0). The default ``num_draws = slots`` guarantees at most
``slots`` unique ids, so nothing is ever dropped and the estimate is exactly unbiased. With
``num_draws > slots`` (the paper's N≈50 draws giving ~12 unique tokens on a large vocabulary)
a position with more unique ids than slots keeps the ``slots`` with the largest estimates
(ties: lower id first) and the dropped draws' mass is lost (values then sum to < 1: a bias,
reported by :class:`SampleStats` as the truncated fraction of positions).

Determinism: the draws of one sample use a ``torch.Generator`` seeded from
``sha256(seed, sample_id)`` (:func:`sample_seed`), and only that sample's own positions, so a
resumed, re-batched or multi-rank run draws the same tokens for the same teacher
log-probabilities.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from pipeline.numerics import log1mexp

TARGET_TYPES = ("topk", "sampled", "topk+sampled")
SAMPLED_TYPES = ("sampled", "topk+sampled")


def sample_seed(seed: int, sample_id: str) -> int:
    """63-bit generator seed from the targets seed and a sample ID (stable across processes,
    unlike Python's salted ``hash``): the first 8 bytes of ``sha256(f"{seed}\\0{sample_id}")``."""
    digest = hashlib.sha256(f"{seed}\0{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass
class SampleStats:
    """Running counts over the positions sampled so far (for the precompute log).

    Attributes:
        positions: positions sampled.
        unique_sum: Σ number of unique ids kept per position.
        truncated: positions with more unique ids than slots (only when num_draws > slots).
    """

    positions: int = 0
    unique_sum: int = 0
    truncated: int = 0

    def summary(self) -> str:
        if not self.positions:
            return "no positions sampled"
        return (f"{self.unique_sum / self.positions:.2f} unique ids per position, "
                f"{self.truncated / self.positions:.2%} of positions truncated to the slot budget")


def _estimate(logprobs: torch.Tensor, num_draws: int, slots: int, sample_temperature: float,
              generator: torch.Generator, stats: SampleStats | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num_draws`` tokens per row and return the ``slots`` largest estimated log-probs.

    Args:
        logprobs: (P, V) float32 log-probabilities of the distribution to estimate; ``-inf``
            entries are never drawn; every row must have at least one finite entry.
    Returns:
        ids (P, slots) int64 and values (P, slots) float32 = ``log p̂`` (``-inf`` = padding,
        id 0), sorted descending; ``p̂`` sums to 1 per row unless truncated.
    """
    P, V = logprobs.shape
    proposal = logprobs if sample_temperature == 1.0 else torch.log_softmax(logprobs / sample_temperature, dim=-1)
    draws = torch.multinomial(proposal.exp(), num_draws, replacement=True, generator=generator)  # (P, N)
    counts = torch.zeros(P, V, dtype=torch.float32, device=logprobs.device)
    counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float32))
    if sample_temperature == 1.0:
        log_est = counts.log() - torch.log(torch.tensor(float(num_draws)))
        # order: count descending, then id ascending (an exact, tie-free float64 key)
        key = counts.double() * V - torch.arange(V, dtype=torch.float64, device=counts.device)
    else:  # self-normalised importance weights c_i · p_i / π_i (Owen 2013, §9.2)
        log_w = torch.where(counts > 0, counts.log() + logprobs - proposal, -torch.inf)
        log_est = log_w - torch.logsumexp(log_w, dim=-1, keepdim=True)
        key = log_est.double()
    ids = torch.topk(key, min(slots, V), dim=-1, sorted=True).indices  # (P, slots)
    vals = log_est.gather(-1, ids)
    pad = torch.isneginf(vals)
    ids = ids.masked_fill(pad, 0)
    if stats is not None:
        uniq = (counts > 0).sum(-1)
        stats.positions += P
        stats.unique_sum += int(uniq.clamp(max=slots).sum())
        stats.truncated += int((uniq > slots).sum())
    return ids, vals


def sampled_targets(logprobs: torch.Tensor, k: int, target_type: str, *, num_draws: int, head_k: int = 0,
                    sample_temperature: float = 1.0, generator: torch.Generator,
                    stats: SampleStats | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled (or exact head + sampled tail) targets of ONE sample's positions.

    Args:
        logprobs: (P, V) float32 teacher log-probabilities at the cache temperature, P = T-1
            positions of one sample (no padding positions: they would consume draws).
        k: slots per position (``cache.k``).
        target_type: ``sampled`` or ``topk+sampled``.
        num_draws: N ≥ 1 draws per position (for ``topk+sampled``: draws from the tail).
        head_k: exact head size for ``topk+sampled`` (1 ≤ head_k < k), ignored for ``sampled``.
        sample_temperature: proposal temperature s (> 0; 1 = exactly unbiased).
        generator: seeded with :func:`sample_seed` for determinism.
    Returns:
        ``ids`` (P, k) int32, ``values`` (P, k) float32 (log estimated probabilities, sorted
        descending, ``-inf`` padding), ``tail_logprob`` (P,) float32 = log of the true mass
        outside the stored ids (``-inf`` when they hold it all).
    Raises:
        ValueError: unknown type, or head_k / k out of range.
    """
    P, V = logprobs.shape
    lp = logprobs.float()
    if target_type == "sampled":
        ids, vals = _estimate(lp, num_draws, k, sample_temperature, generator, stats)
    elif target_type == "topk+sampled":
        if not 1 <= head_k < k:
            raise ValueError(f"targets.head_k={head_k} must be in [1, cache.k={k})")
        head_vals, head_ids = torch.topk(lp, head_k, dim=-1, sorted=True)  # (P, head_k)
        log_tail_mass = log1mexp(torch.logsumexp(head_vals, dim=-1))  # (P,)
        rest = lp.scatter(1, head_ids, -torch.inf)
        empty = torch.isneginf(log_tail_mass) | torch.isneginf(rest).all(-1)
        rest = torch.where(empty[:, None], 0.0, rest)  # dummy uniform rows; their values become -inf below
        t_ids, t_vals = _estimate(torch.log_softmax(rest, dim=-1), num_draws, k - head_k, sample_temperature,
                                  generator, stats)
        t_vals = torch.where(empty[:, None], -torch.inf, t_vals + log_tail_mass[:, None])
        vals, order = torch.sort(torch.cat([head_vals, t_vals], -1), dim=-1, descending=True, stable=True)
        ids = torch.cat([head_ids, t_ids], -1).gather(-1, order)
        ids = ids.masked_fill(torch.isneginf(vals), 0)
    else:
        raise ValueError(f"targets.type {target_type!r} is not one of {SAMPLED_TYPES}")
    kept = lp.gather(-1, ids).masked_fill(torch.isneginf(vals), -torch.inf)  # true log p of the stored ids
    tail = log1mexp(torch.logsumexp(kept, dim=-1))
    return ids.to(torch.int32), vals, tail

