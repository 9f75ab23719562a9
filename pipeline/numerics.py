"""Numerics both stages share: stable log-space helpers."""
from __future__ import annotations

import torch


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends.

    Source: Mächler, "Accurately Computing log(1 − exp(−|a|))" (Rmpfr vignette, 2012):
    ``log(-expm1(x))`` for ``x > -ln 2``, ``log1p(-exp(x))`` otherwise. Returns ``-inf`` at 0.
    """
    x = x.clamp(max=0.0)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
