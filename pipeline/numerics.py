"""Numerics both stages share: stable log-space helpers, the logit soft-cap, and the teacher
statistics of stored targets (one definition for the loss logs and ``inspect-cache``)."""
from __future__ import annotations

import numpy as np
import torch


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends.

    Source: Mächler, "Accurately Computing log(1 − exp(−|a|))" (Rmpfr vignette, 2012):
    ``log(-expm1(x))`` for ``x > -ln 2``, ``log1p(-exp(x))`` otherwise. Returns ``-inf`` at 0.
    """
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def softcap_(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Soft-cap logits in place, ``z ← cap · tanh(z / cap)`` (Gemma 2's
    ``final_logit_softcapping``, applied by transformers after the output layer); ``cap`` None:
    ``z`` unchanged. Its derivative, ``1 − tanh²(z / cap)``, is ``1 − (capped / cap)²``.
    Returns ``z``."""
    if cap is None:
        return z
    return z.div_(cap).tanh_().mul_(cap)


def position_stats(topk_logprobs: np.ndarray, tail_logprob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The teacher statistics of stored targets, per position: one definition for the loss
    logs (``topk_mass_sum``, ``teacher_entropy_sum``) and ``inspect-cache`` (``topk_mass``,
    ``teacher_entropy_nats``); docs/design.md, "Teacher statistics".

    * mass: ``1 - exp(tail_logprob)``, the teacher's true probability mass on the stored ids
      (every target type stores the true tail; for ``topk`` it equals ``Σ_k exp(v)`` up to
      float32 rounding).
    * entropy (nats): the entropy of the stored distribution completed by one outcome that
      holds the mass it leaves out, ``-Σ_k p_k log p_k - r log r`` with ``p = exp(v)`` and
      ``r = max(0, 1 - Σ_k p_k)``. For ``topk`` targets ``r`` is the tail and this is a lower
      bound on the full teacher entropy, exact when the tail is empty (grouping outcomes never
      raises entropy; Cover & Thomas, *Elements of Information Theory*, 2nd ed., §2.8). For
      sampled targets (values that already estimate the whole distribution) it is the
      plug-in entropy of the estimate.

    Args:
        topk_logprobs: (P, k) float32 log-probabilities (``-inf`` = padding slot).
        tail_logprob: (P,) float32 log of the teacher mass outside the stored ids (``-inf``
            for none).
    Returns:
        ``(mass, entropy)``: two (P,) float64 arrays.
    """
    lp = topk_logprobs.astype(np.float64)
    p = np.exp(lp)  # padding slots: exp(-inf) = 0
    ent = -(p * np.where(p > 0, lp, 0.0)).sum(1)
    rest = np.clip(1.0 - p.sum(1), 0.0, 1.0)
    ent -= rest * np.log(np.where(rest > 0, rest, 1.0))
    mass = -np.expm1(tail_logprob.astype(np.float64))
    return mass, ent
