"""The divergences ``D(p, q)`` of the distillation term, over the loss's categories.

The teacher ``p`` and the student ``q`` are distributions over the categories ``C`` that the
tail mode defines (pipeline/student/losses.py): ``bucket`` — the cached ids plus one tail
outcome (``p_tail`` from the cache, ``q_tail = 1 − Σ_S q``); ``renormalize`` — the cached ids,
both renormalised over them. Categories whose teacher probability is 0 (padding slots, an
empty tail) are left out of ``C``. One exception keeps today's loss: ``forward_kl`` with
``renormalize`` renormalises the teacher only, ``Σ_S p log(p/q)`` with the student's
full-vocabulary ``q`` — that is ``KL(p ‖ q̃) − log Σ_S q``, which also pulls the student's mass
into the cached ids (and ``sampled`` caches take forward KL only). With ``m`` a mixture of the
two:

==================  ===========================================  ===============================
``forward_kl``      ``Σ_C p log(p/q)``                           Hinton et al. 2015
``reverse_kl``      ``Σ_C q log(q/p)``                           Gu et al. 2024 (MiniLLM)
``jsd``             ``β KL(p‖m) + (1−β) KL(q‖m)``,               Agarwal et al. 2024 (GKD),
                    ``m = β p + (1−β) q``, ``β ∈ (0, 1)``          eq. 1; TRL ``generalized_jsd_loss``
``skew_forward_kl`` ``KL(p ‖ λ p + (1−λ) q)``                    Ko et al. 2024 (DistiLLM)
``skew_reverse_kl`` ``KL(q ‖ λ q + (1−λ) p)``, ``λ ∈ [0, 1)``     Ko et al. 2024 (DistiLLM)
``tvd``             ``½ Σ_C |p − q|``                            total variation distance
``akl``             ``w_head KL(p‖q) + w_tail KL(q‖p)``          Wu et al. 2024 (AKL)
==================  ===========================================  ===============================

``akl`` (Wu et al., "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for
Large Language Models", 2024): sort ``C`` by ``p`` descending; the head is the categories
whose cumulative teacher mass (their own included) is at most ``μ`` (``loss.akl_mu``, 0.5),
and always the first; the tail the rest; ``g_head = Σ_head |p − q|``, ``g_tail = Σ_tail |p − q|``,
``w_head = g_head / (g_head + g_tail)``, ``w_tail = g_tail / (g_head + g_tail)`` (both 0 when
``p = q``). As in the authors' code (the student's probabilities are detached when the ratios
are formed), **the mixing weights carry no gradient**: the gradient is
``w_head ∇KL(p‖q) + w_tail ∇KL(q‖p)``.

For the fused output layer each divergence gives, besides its value, ``g_c = ∂D/∂log q_c``
(the other ``log q`` held fixed); :func:`category_terms` returns both, and
pipeline/student/losses.py chains ``g`` through ``log q_c(z)`` to the logits in closed form:

* ``forward_kl``: ``g = −p``;  ``reverse_kl``: ``g = q (log q − log p + 1)``;
* ``jsd``: ``g = (1−β) q log(q/m)``  (``∂D/∂q_c = (1−β) log(q_c/m_c)``);
* ``skew_forward_kl``: ``g = −(1−λ) p q / m``;
* ``skew_reverse_kl``: ``g = q (log(q/m) + 1 − λ q/m)``;
* ``tvd``: ``g = ½ q sign(q − p)`` (a subgradient: 0 where ``p = q``);
* ``akl``: ``w_head g_forward + w_tail g_reverse``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "akl")


@dataclass(frozen=True)
class Divergence:
    """A divergence and its parameters (``loss.divergence``, ``loss.beta``, ``loss.skew``,
    ``loss.akl_mu``).

    Attributes:
        name: one of :data:`DIVERGENCES`.
        beta: ``β`` of ``jsd``, in (0, 1).
        skew: ``λ`` of the skew KLs, in [0, 1).
        akl_mu: ``μ`` of ``akl``, the head's teacher mass, in (0, 1).
    Raises:
        ValueError: an unknown name or a parameter out of range (naming the config key).
    """

    name: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    akl_mu: float = 0.5

    def __post_init__(self):
        if self.name not in DIVERGENCES:
            raise ValueError(f"loss.divergence must be one of {DIVERGENCES}, got {self.name!r}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"loss.beta must be in (0, 1), got {self.beta}")
        if not 0.0 <= self.skew < 1.0:
            raise ValueError(f"loss.skew must be in [0, 1), got {self.skew}")
        if not 0.0 < self.akl_mu < 1.0:
            raise ValueError(f"loss.akl_mu must be in (0, 1), got {self.akl_mu}")

    @classmethod
    def from_config(cls, loss_cfg) -> "Divergence":
        """From a :class:`~pipeline.config.LossConfig` (or anything with those attributes)."""
        return cls(getattr(loss_cfg, "divergence", "forward_kl"), getattr(loss_cfg, "beta", 0.5),
                   getattr(loss_cfg, "skew", 0.1), getattr(loss_cfg, "akl_mu", 0.5))

    def params(self) -> dict:
        """The name and the parameters it uses (for ``run.json`` and the metrics' config)."""
        used = {"jsd": ("beta",), "skew_forward_kl": ("skew",), "skew_reverse_kl": ("skew",), "akl": ("akl_mu",)}
        return {"divergence": self.name, **{k: getattr(self, k) for k in used.get(self.name, ())}}


def _mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w a + (1 − w) b)`` from ``log a``, ``log b`` (``0 < w < 1``; ``w = 0``: ``log b``)."""
    if w == 0.0:
        return log_b
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def _kl(log_a: torch.Tensor, a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``Σ a (log a − log b)`` per row (dead categories carry ``a = 0`` and finite logs)."""
    return (a * (log_a - log_b)).sum(-1)


def category_terms(log_p: torch.Tensor, log_q: torch.Tensor, live: torch.Tensor,
                   div: Divergence) -> tuple[torch.Tensor, torch.Tensor]:
    """The divergence per position and its gradient with respect to ``log q`` (module docstring).

    Args:
        log_p: (n, C) teacher log-probabilities over the categories (any value where dead).
        log_q: (n, C) student log-probabilities (finite where live; any value where dead).
        live: (n, C) bool, the categories in ``C`` (teacher probability > 0).
        div: the :class:`Divergence`.
    Returns:
        ``(D, g)``: (n,) the divergence in nats and (n, C) ``∂D/∂log q`` (0 where dead), in
        the dtype of ``log_q`` (float32, float64 in tests).
    """
    lp = torch.where(live, log_p, 0.0)
    lq = torch.where(live, log_q, 0.0)
    p = torch.where(live, lp.exp(), 0.0)
    q = torch.where(live, lq.exp(), 0.0)
    name = div.name
    if name == "forward_kl":
        return _kl(lp, p, lq), -p
    if name == "reverse_kl":
        return _kl(lq, q, lp), q * (lq - lp + 1.0)
    if name == "jsd":
        b = div.beta
        lm = _mix(lp, lq, b)
        return b * _kl(lp, p, lm) + (1 - b) * _kl(lq, q, lm), (1 - b) * q * (lq - lm)
    if name == "skew_forward_kl":
        lam = div.skew
        lm = _mix(lp, lq, lam)
        return _kl(lp, p, lm), -(1 - lam) * p * (lq - lm).exp()
    if name == "skew_reverse_kl":
        lam = div.skew
        lm = _mix(lq, lp, lam)
        r = (lq - lm).exp()
        return _kl(lq, q, lm), q * (lq - lm + 1.0 - lam * r)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1), 0.5 * q * torch.sign(q - p)
    # akl: weights from the head/tail gaps of the teacher-sorted categories, no gradient
    order = torch.argsort(p, dim=-1, descending=True, stable=True)
    ps, gap = p.gather(-1, order), (p - q).abs().gather(-1, order)
    head = torch.cumsum(ps, -1) <= div.akl_mu
    head[:, 0] = True
    g_head, g_tail = (gap * head).sum(-1), (gap * ~head).sum(-1)
    denom = (g_head + g_tail).clamp(min=1e-12)
    w_head, w_tail = g_head / denom, g_tail / denom
    d = w_head * _kl(lp, p, lq) + w_tail * _kl(lq, q, lp)
    return d, w_head[:, None] * -p + w_tail[:, None] * q * (lq - lp + 1.0)
