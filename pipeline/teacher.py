"""Teacher (or same-vocabulary ensemble) forward → sparse top-k log-probabilities.

For every position ``t`` the targets are the top-k of the full-vocabulary teacher
log-softmax at the cache temperature, plus the log of the probability mass outside them
(the tail), computed in float32 (DESIGN.md, Teacher targets).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends.

    Source: Mächler, "Accurately Computing log(1 − exp(−|a|))" (Rmpfr vignette, 2012):
    ``log(-expm1(x))`` for ``x > -ln 2``, ``log1p(-exp(x))`` otherwise. Returns ``-inf`` at 0.
    """
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@dataclass
class TeacherTargets:
    """Sparse teacher targets for a batch of B sequences of padded length T.

    Attributes:
        topk_ids: (B, T-1, k) int32, sorted by descending probability.
        topk_logprobs: (B, T-1, k) float32, full-softmax log-probabilities, ``<= 0``.
        tail_logprob: (B, T-1) float32, ``log(1 - sum(exp(topk_logprobs)))`` (``-inf`` when
            the top-k holds all the mass).
        target_logprob: (B, T-1) float32, teacher log-probability of the actual next token
            (the teacher's own negative CE; used for the teacher's perplexity).
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    tail_logprob: torch.Tensor
    target_logprob: torch.Tensor


@torch.no_grad()
def ensemble_logprobs(teachers: list[nn.Module], weights: list[float], input_ids: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Mixture log-probabilities of same-vocabulary teachers, in probability space.

    ``log p = logsumexp_m(log w_m + log_softmax(z_m / temperature))`` with ``w`` normalised;
    only one teacher's full-vocabulary output is alive beside the running mixture.

    Args:
        input_ids: (B, T) int64, right-padded (causal attention makes padding harmless for
            the positions before it, so no attention mask is passed).
    Returns:
        (B, T, V) float32 log-probabilities.
    """
    total = float(sum(weights))
    mix = None
    for model, w in zip(teachers, weights):
        logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
        lp = F.log_softmax(logits.float() / temperature, dim=-1)
        del logits
        if len(teachers) == 1:
            return lp
        lp.add_(torch.log(torch.tensor(w / total)))
        mix = lp if mix is None else torch.logaddexp(mix, lp, out=mix)
    return mix


def topk_targets(logprobs: torch.Tensor, input_ids: torch.Tensor, k: int) -> TeacherTargets:
    """Top-k and tail log-mass of per-position log-probabilities.

    Args:
        logprobs: (B, T, V) float32 full-vocabulary log-probabilities.
        input_ids: (B, T) int64; position t's target is ``input_ids[:, t+1]``.
        k: entries kept per position (``k <= V``).
    Returns:
        :class:`TeacherTargets` for positions ``0..T-2``.
    Raises:
        ValueError: ``k`` larger than the vocabulary.
    """
    V = logprobs.shape[-1]
    if k > V:
        raise ValueError(f"cache.k={k} exceeds the teacher vocabulary size {V}")
    lp = logprobs[:, :-1]  # (B, T-1, V)
    vals, ids = torch.topk(lp, k, dim=-1, sorted=True)  # (B, T-1, k)
    tail = log1mexp(torch.logsumexp(vals, dim=-1))  # (B, T-1)
    target = lp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return TeacherTargets(ids.to(torch.int32), vals, tail, target)
