"""Dense references of the teacher's targets: full (B, T, V) log-probabilities of a teacher or
ensemble and their top-k (the pre-fusion implementation).

Kept for the tests and bench/cache_bench.py only: the precompute path is
``pipeline.teacher.topk.fused_topk_targets``, which computes the same targets chunk by chunk
from the teachers' hidden states and must equal these (tests/test_fused_targets.py). Formulas:
``pipeline.teacher.topk.position_logprobs``.

Imported as ``reference_targets`` by the tests (``tests/`` is on ``sys.path``) and as
``tests.reference_targets`` by the benches (the repository root on ``sys.path``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.numerics import log1mexp


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


COMBINE_MODES = ("probability", "logit_mean")
"""The ``combine`` values :func:`ensemble_logprobs` accepts (the config's ``combine``)."""


@torch.no_grad()
def ensemble_logprobs(teachers: list[nn.Module], weights: list[float], input_ids: torch.Tensor,
                      temperature: float = 1.0, vocab: int | None = None,
                      combine: str = "probability") -> torch.Tensor:
    """Full-vocabulary log-probabilities of one teacher or a same-tokenizer ensemble.

    Each teacher's logits are sliced to the first ``vocab`` entries (the shared tokenizer's
    vocabulary: rows of an embedding matrix padded beyond the tokenizer are never valid
    tokens, so they get no probability) and tempered: ``lp_m = log_softmax(z_m[..., :V] / τ)``.
    With normalised weights ``w_m = weight_m / Σ weight``:

    - ``probability`` (mixture of experts in probability space, DESIGN.md):
      ``log p = logsumexp_m(log w_m + lp_m)``;
    - ``logit_mean`` (normalised weighted geometric mean, a "product of experts"):
      ``log p = log_softmax(Σ_m w_m · lp_m)``, equal to ``log_softmax(Σ_m w_m z_m / τ)``.

    A single teacher returns ``lp_0`` unchanged (bit for bit the plain path). Memory: only one
    teacher's (B, T, V) output is alive beside the running mixture (the next teacher runs
    after the previous one's logits are freed).

    Args:
        teachers: M causal LMs called as ``model(input_ids=..., use_cache=False).logits``.
        weights: M positive mixture weights (normalised here).
        input_ids: (B, T) int64, right-padded (causal attention makes padding harmless for
            the positions before it, so no attention mask is passed).
        temperature: τ > 0.
        vocab: V, the number of real tokens (``len(tokenizer)``); None keeps every logit.
        combine: ``probability`` or ``logit_mean``.
    Returns:
        (B, T, V) float32 log-probabilities.
    Raises:
        ValueError: unknown ``combine``, weights not matching the teachers, a teacher with
            fewer than ``vocab`` outputs.
    """
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    if len(weights) != len(teachers) or not teachers or min(weights) <= 0:
        raise ValueError(f"need one positive weight per teacher, got {weights} for {len(teachers)} teacher(s)")

    def member_logprobs():
        for model in teachers:
            logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V_model)
            if vocab is not None:
                if logits.shape[-1] < vocab:
                    raise ValueError(f"teacher {type(model).__name__} has {logits.shape[-1]} output logits, fewer "
                                     f"than the tokenizer's {vocab} tokens")
                logits = logits[..., :vocab]
            lp = F.log_softmax(logits.float() / temperature, dim=-1)
            del logits
            yield lp

    total = float(sum(weights))
    mix = None
    for lp, w in zip(member_logprobs(), weights):
        if len(weights) == 1:
            return lp
        if combine == "probability":
            lp.add_(math.log(w / total))
            mix = lp if mix is None else torch.logaddexp(mix, lp, out=mix)
        else:
            lp.mul_(w / total)
            mix = lp if mix is None else mix.add_(lp)
        del lp
    return mix if combine == "probability" else F.log_softmax(mix, dim=-1)


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
