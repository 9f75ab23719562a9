"""Teacher (or same-vocabulary ensemble) forward → sparse top-k log-probabilities.

For every position ``t`` the targets are the top-k of the full-vocabulary teacher
log-softmax at the cache temperature, plus the log of the probability mass outside them
(the tail), computed in float32 (DESIGN.md, Teacher targets), chunk by chunk from the
teachers' hidden states (:func:`fused_topk_targets`). The dense (B, T, V) reference of the same
targets, for the tests and bench/cache_bench.py, is tests/reference_targets.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.numerics import log1mexp, softcap_


def _combine(member_logprobs, weights: list[float], combine: str) -> torch.Tensor:
    """The ensemble's log-probabilities from its members' (an iterator of (..., V) float32
    tensors, consumed one at a time and modified in place): ``probability`` =
    ``logsumexp_m(log w_m + lp_m)``, ``logit_mean`` = ``log_softmax(Σ_m w_m lp_m)`` with
    ``w_m = weight_m / Σ weight`` (formulas: :func:`position_logprobs`). One member: its
    tensor unchanged."""
    total = float(sum(weights))
    mix = None
    for lp, w in zip(member_logprobs, weights):
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


TARGETS_CHUNK_BYTES = 64 * 2**20
"""Budget of one chunk's float32 logits, (rows, V) × 4 bytes per teacher, in
:func:`fused_topk_targets` (64 MiB: 524 rows at V = 32,000, 110 at V = 152,064)."""


def output_head(model: nn.Module, vocab: int) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """The first ``vocab`` rows of a teacher's output layer: ``weight`` (vocab, H) and ``bias``
    (vocab,) or None, in the parameter dtype, and its logit soft-cap ``c`` (Gemma 2's
    ``final_logit_softcapping``: ``logits = c · tanh(z / c)``) or None.

    The teacher's output layer must be a :class:`pipeline.models.OutputProjection` (its forward
    then returns the final hidden states). Under FSDP2 call it after the root forward: the
    root's parameters are then unsharded (full tensors) until ``reshard()``.

    Raises:
        ValueError: the output layer has fewer than ``vocab`` rows.
    """
    head = model.get_output_embeddings()
    if head.weight.shape[0] < vocab:
        raise ValueError(f"teacher {type(model).__name__} has {head.weight.shape[0]} output logits, fewer than "
                         f"the tokenizer's {vocab} tokens")
    bias = getattr(head, "bias", None)
    return head.weight[:vocab], None if bias is None else bias[:vocab], getattr(head, "softcap", None)


def _unpack(head: tuple) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """``(weight, bias, softcap)`` of a head given as :func:`output_head` returns it, or as
    ``(weight, bias)`` (no soft-cap)."""
    w, b, *cap = head
    return w, b, cap[0] if cap else None


def position_logprobs(hiddens: list[torch.Tensor], heads: list[tuple], weights: list[float], rows: torch.Tensor,
                      temperature: float = 1.0, combine: str = "probability") -> torch.Tensor:
    """Full-vocabulary log-probabilities of the ensemble at some positions only.

    Each teacher's logits ``z_m`` come from its output layer's first V rows (the shared
    tokenizer's vocabulary, :func:`output_head`: rows of an embedding matrix padded beyond the
    tokenizer are never valid tokens, so they get no probability), soft-capped where the teacher
    caps them (``z ← c · tanh(z / c)``), and are tempered: ``lp_m = log_softmax(z_m / τ)``.
    With normalised weights ``w_m = weight_m / Σ weight``:

    - ``probability`` (mixture of experts in probability space, DESIGN.md):
      ``log p = logsumexp_m(log w_m + lp_m)``;
    - ``logit_mean`` (normalised weighted geometric mean, a "product of experts"):
      ``log p = log_softmax(Σ_m w_m · lp_m)``, equal to ``log_softmax(Σ_m w_m z_m / τ)``.

    A single teacher gives ``lp_0`` unchanged.

    Args:
        hiddens: per teacher, final hidden states (B·T, H) in the parameter dtype.
        heads: per teacher, ``(weight (V, H), bias (V,) or None, soft-cap or None)``
            (:func:`output_head`; a pair without the soft-cap: none).
        weights: mixture weights (normalised here).
        rows: (n,) int64 flat positions into B·T.
        temperature: τ > 0.
        combine: ``probability`` or ``logit_mean`` (the config validates it; any other value
            is taken as ``logit_mean``).
    Returns:
        (n, V) float32, equal to the full (B, T, V) log-probabilities of the whole teachers at
        those positions up to float rounding (the output layer runs on these rows only; the
        dense reference: tests/reference_targets.py ``ensemble_logprobs``).
    """
    def member_logprobs():
        for h, (w, b, cap) in zip(hiddens, map(_unpack, heads)):
            logits = softcap_(F.linear(h[rows], w, b).float(), cap)
            if temperature != 1.0:
                logits.div_(temperature)
            yield F.log_softmax(logits, dim=-1)

    return _combine(member_logprobs(), weights, combine)


EXP_SAFE = 60.0
"""Rows whose largest logit lies in [-EXP_SAFE, EXP_SAFE] are exponentiated without shifting by
their maximum: ``exp(60) · 152,064 ≈ 1.7e31`` cannot overflow float32 (3.4e38), and terms more
than ~27 nats below a maximum ≥ -60 that underflow hold less than ``V·e⁻²⁷`` of the mass."""


def _log_normaliser(z: torch.Tensor, zmax: torch.Tensor) -> torch.Tensor:
    """``logsumexp(z, -1)`` of float32 logits (n, V) given their row maxima ``zmax`` (n,) (the
    top-1 of :func:`torch.topk`), computed in two passes over ``z`` (exp in place, sum) instead of
    four: rows with ``|max| ≤ EXP_SAFE`` skip the shift by the maximum (same result up to float
    rounding), the others are shifted first. Overwrites ``z``. Returns (n,) float32."""
    safe = zmax.abs() <= EXP_SAFE
    if not bool(safe.all()):
        shift = torch.where(safe, 0.0, zmax)[:, None]
        z.sub_(shift)
        return torch.log(z.exp_().sum(dim=-1)) + shift[:, 0]
    return torch.log(z.exp_().sum(dim=-1))


def fused_topk_targets(hiddens: list[torch.Tensor], heads: list[tuple], weights: list[float], rows: torch.Tensor,
                       next_ids: torch.Tensor, k: int, temperature: float = 1.0, combine: str = "probability",
                       chunk_bytes: int = TARGETS_CHUNK_BYTES) -> tuple[torch.Tensor, ...]:
    """Top-k, tail mass and next-token log-probability at the given positions, computed from the
    teachers' final hidden states chunk by chunk: per chunk of rows the output layer (and its
    soft-cap), the tempered log-softmax (or, for one teacher, its log-normaliser), the top-k and
    the tail, so no (B, T, V) tensor exists and padding positions cost nothing (the same idea as
    the student's fused loss, pipeline/student/fused_driver.py; Liger-Kernel's fused linear
    cross-entropy).

    One teacher: the top-k of the (capped) logits are the top-k of the log-probabilities (the
    softmax is monotone), so ``values = z_topk/τ − logsumexp(z/τ)`` and the (rows, V)
    log-softmax is never formed. An ensemble: :func:`position_logprobs` per chunk, then the top-k
    of the mixture.

    Args:
        hiddens, heads, weights, temperature, combine: as :func:`position_logprobs`.
        rows: (N,) int64 flat positions into B·T; next_ids: (N,) int64 the token after each.
        k: entries kept per position (k ≤ V).
        chunk_bytes: float32 logits budget of one chunk per teacher (bytes).
    Returns:
        ``ids`` (N, k) int32 sorted by descending probability, ``values`` (N, k) float32 log
        probabilities, ``tail`` (N,) float32 log of the mass outside them (:func:`log1mexp`),
        ``target`` (N,) float32 log-probability of ``next_ids``.
    Raises:
        ValueError: ``k`` larger than the vocabulary.
    """
    V = heads[0][0].shape[0]
    if k > V:
        raise ValueError(f"cache.k={k} exceeds the teacher vocabulary size {V}")
    N = rows.numel()
    step = max(1, chunk_bytes // (4 * V))
    dev = hiddens[0].device
    ids = torch.empty(N, k, dtype=torch.int32, device=dev)
    vals = torch.empty(N, k, dtype=torch.float32, device=dev)
    target = torch.empty(N, dtype=torch.float32, device=dev)
    buf = None
    for a in range(0, N, step):
        r, nxt = rows[a: a + step], next_ids[a: a + step, None]
        if len(hiddens) == 1:
            w, b, cap = _unpack(heads[0])
            h = hiddens[0][r]
            if h.dtype == torch.float32:  # one chunk buffer for every chunk: no fresh pages per chunk
                buf = torch.empty(min(step, N), V, device=dev) if buf is None else buf
                z = torch.matmul(h, w.t(), out=buf[: len(r)])
                if b is not None:
                    z.add_(b)
            else:  # bf16/fp16 teachers: the logits in the parameter dtype, the softmax in float32
                z = F.linear(h, w, b).float()
            softcap_(z, cap)  # the model's own logits are capped before any temperature
            if temperature != 1.0:
                z.div_(temperature)
            v, i = torch.topk(z, k, dim=-1, sorted=True)
            t = z.gather(-1, nxt).squeeze(-1)
            vals[a: a + step], target[a: a + step] = v, t
            log_norm = _log_normaliser(z, v[:, 0])
            vals[a: a + step] -= log_norm[:, None]
            target[a: a + step] -= log_norm
        else:
            lp = position_logprobs(hiddens, heads, weights, r, temperature, combine)
            v, i = torch.topk(lp, k, dim=-1, sorted=True)
            vals[a: a + step] = v
            target[a: a + step] = lp.gather(-1, nxt).squeeze(-1)
        ids[a: a + step] = i
    tail = log1mexp(torch.logsumexp(vals, dim=-1))
    return ids, vals, tail, target
