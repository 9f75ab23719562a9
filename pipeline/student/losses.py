"""Sum-reduced CE and sparse KL (DESIGN.md, Loss), or another divergence ``D`` in place of the
KL (``loss.divergence``: formulas, sources and their gradients in
:mod:`pipeline.student.divergences`; chained to the logits by :func:`_divergence_terms`).

For student logits ``z_t`` (vocab V), training temperature ``τ`` and teacher support ``S_t``
(the cached ids; ``-inf`` padding slots of sampled caches are excluded everywhere)::

    CE_t = -log_softmax(z_t)[y_t]
    KL_t = Σ_{i∈S_t} p_t(i) (log p_t(i) - log q_t(i)) [+ p_tail (log p_tail - log q_tail)]
    loss_sum = α Σ_t CE_t + (1-α) τ² Σ_t KL_t          (sums over valid positions)

with ``log q_t = log_softmax(z_t / τ)`` over the full vocabulary. The ``τ²`` factor keeps the
gradient scale independent of τ (Hinton et al., "Distilling the Knowledge in a Neural
Network", 2015, §2). Tail modes:

* ``renormalize``: ``p_t = softmax((T_c/τ) · cached_S)`` over the support only (the cache holds
  ``log_softmax(z_teacher/T_c)``); the tail mass is dropped. Exact KL(p_S || q) restricted to S with an unnormalised ``q``; biased towards an
  over-confident student when the top-k mass is small (Anshumann et al., ACL 2025).
* ``bucket`` (default): the teacher's tail mass is one extra outcome,
  ``q_tail = 1 - Σ_{i∈S} q_t(i)``, so the student is also taught how much mass to leave
  outside the support. Equals the dense KL when S is the whole vocabulary. At ``τ`` equal to
  the cache temperature it is exact KL between the (k+1)-outcome coarsenings of p and q; at
  other ``τ`` the tempered tail mass needs the whole vocabulary, so it is refused unless the
  cache holds every id (:func:`check_temperatures`).
* ``sampled``: for ``sampled`` / ``topk+sampled`` caches, whose values are an estimate ``p̂``
  of the whole teacher distribution (pipeline/teacher/sampled.py): ``KL_t = Σ_{i∈S_t} p̂(i) (log p̂(i)
  - log q_t(i))`` with no renormalisation and no tail bucket. Its gradient
  ``-Σ_i p̂(i) ∇log q_t(i)`` is linear in ``p̂`` and ``E[p̂] = p``, so it is an unbiased
  estimate of ``∇ KL(p || q)`` (Anshumann et al., "Sparse Logit Sampling", ACL 2025, §3) at
  ``τ`` equal to the cache temperature. ``p̂`` is never re-tempered (a sampled estimate of
  ``p`` gives none of ``p^(1/τ)``): at another ``τ`` the student's ``q_τ`` is fitted to the
  cache-temperature distribution. The KL value itself is a biased, noisy estimate (``Σ p̂ log p̂``
  is not ``Σ p log p``); only its gradient is unbiased.

Temperature, in short (:func:`teacher_log_probs`): cached values are re-tempered by ``T_c/τ``.
``renormalize`` is exact at every ``τ`` (it ignores the tail by definition); ``bucket`` is exact
at ``τ = T_c`` or ``k = V`` and refused otherwise; ``sampled`` keeps the cache-temperature target.

Fused output layer (:func:`fused_linear_loss`): the student's final hidden states of the valid
positions ``(N, H)`` go through the output projection ``W`` (V, H) chunk by chunk; each chunk
forms its float32 logits (soft-capped where the model caps them), the log-softmax statistics,
CE, KL, per-position values and — in the same pass — the gradient with respect to its hidden
states and to ``W`` (the scheme of Liger-Kernel's ``fused_linear_cross_entropy`` /
``fused_linear_jsd``, written in plain PyTorch so CPUs get it too). The chunk loop, its
precision and its chunk size are :mod:`pipeline.student.fused_driver`'s, shared with the
cross-tokenizer loss; this module supplies the per-chunk terms (:func:`_hybrid_terms`). No
``(N, V)`` or ``(B, T, V)`` tensor exists; the ``(chunk, V)`` temporaries are bounded by a byte
budget. The closed-form logit gradients it uses (``q`` the student's softmax at temperature τ,
``S`` the live support):

    ∂CE_t/∂z = softmax(z) − onehot(y)
    ∂KL_t/∂z = (1/τ) (A_t q − scatter_S(B_t))
      sampled / renormalize:  A_t = Σ_S p,  B_t = p
      bucket:                 A_t = Σ_S p − r_t Q_S,  B_t = p − r_t q_S,
                              r_t = p_tail / q_tail,  Q_S = Σ_S q  (r_t = 0 where q_tail is clamped)

Another divergence replaces ``(A_t, B_t)`` by those of :func:`_divergence_terms` (same form);
the forward KL is still computed for the logged ``kl_sum``.

The function returns sums and counts; the trainer divides once by the global valid-token count.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pipeline.data.batch import LossTargets
from pipeline.student.divergences import Divergence, category_terms
from pipeline.student.fused_driver import AUTO_CHUNK_BYTES, ChunkTerms, chunk_rows, fused_output_loss
from pipeline.numerics import log1mexp

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


def check_temperatures(tail: str, temperature: float, cache_temperature: float, k: int, vocab_size: int,
                       cross_tokenizer: bool = False) -> None:
    """Refuse a training temperature the cached targets cannot give exactly.

    The cache holds top-k values at ``T_c``; re-tempering them to ``τ`` is exact on the cached
    ids (:func:`teacher_log_probs`), but the teacher's tail mass at ``τ`` needs the logits of
    every id outside them. So ``bucket`` (and the cross-tokenizer losses, whose teacher side is a
    bucket) at ``τ ≠ T_c`` is refused unless the support is the whole vocabulary (``k ≥ V``; the
    cross-tokenizer losses are refused at any ``τ ≠ T_c``: their support is mapped ids).
    ``renormalize`` is exact at any τ (it drops the tail by definition); ``sampled`` keeps its
    documented rule (the target stays at ``T_c``; :func:`check_tail_mode` warns).

    Args:
        k: cached ids per position. vocab_size: V, the teacher's vocabulary (the manifest's).
        cross_tokenizer: the loss is ``loss.cross_tokenizer`` (gold/uld): refused at any
            ``τ ≠ T_c``.
    Raises:
        ValueError: the refused case, naming ``loss.temperature``, the cache temperature, k, V
            and what to do.
    """
    if temperature == cache_temperature or (k >= vocab_size and not cross_tokenizer):
        return
    if cross_tokenizer or tail == "bucket":
        if cross_tokenizer:
            raise ValueError(f"loss.temperature={temperature} differs from the cache temperature {cache_temperature}: "
                             f"loss.cross_tokenizer needs the teacher's tail mass at {temperature}, which the cache does "
                             f"not hold; train at loss.temperature={cache_temperature} or write the cache at "
                             f"temperature {temperature}")
        raise ValueError(f"loss.temperature={temperature} differs from the cache temperature {cache_temperature}: "
                         f"loss.tail=bucket needs the teacher's tail mass at {temperature}, which a top-{k} cache of a "
                         f"{vocab_size}-token vocabulary does not hold; train at loss.temperature={cache_temperature}, "
                         f"write the cache at temperature {temperature}, or use loss.tail=renormalize")


def resolve_tail(cfg, target_type: str, cache_temperature: float, k: int | None = None,
                 vocab_size: int | None = None):
    """The train config with ``loss.tail`` fixed for the train cache: unset, it defaults to
    ``bucket`` for a ``topk`` cache and ``sampled`` for a ``sampled`` / ``topk+sampled`` one;
    the pair is then checked (:func:`check_tail_mode`) and its warnings issued. No I/O: the
    caller passes what the cache's manifest says. A CE-only config (``loss.alpha`` 1) is
    returned as it is.

    Args:
        cfg: the :class:`~pipeline.config.TrainStudentConfig`.
        target_type: the cache manifest's ``target_type`` (``topk``, ``sampled``, ``topk+sampled``).
        cache_temperature: the manifest's ``temperature``.
        k, vocab_size: the manifest's ``k`` and ``vocab_size``; given, the training temperature
            is checked against the cache's (:func:`check_temperatures`).
    Returns:
        ``cfg`` itself when nothing changes, else a copy with the resolved ``loss.tail``
        (marked as set, so the written ``config.yaml`` shows it).
    Raises:
        ConfigError: a refused pair, naming ``loss.tail`` and the cache's ``target_type``; a
            ``loss.divergence`` other than ``forward_kl`` on a sampled cache; a
            ``loss.temperature`` the cache cannot give exactly (:func:`check_temperatures`).
    """
    import warnings

    from pipeline.config import ConfigError

    if cfg.loss.alpha == 1.0:
        return cfg  # no teacher targets
    tail = cfg.loss.tail if "tail" in cfg.loss.model_fields_set else ("bucket" if target_type == "topk" else "sampled")
    if target_type != "topk" and cfg.loss.divergence != "forward_kl":
        raise ConfigError(f"loss.divergence={cfg.loss.divergence} on a {target_type} cache: sampled targets keep "
                          "forward_kl only (their estimator is unbiased for the forward-KL gradient alone); "
                          "use a topk cache")
    try:
        warns = check_tail_mode(tail, target_type, cfg.loss.temperature, cache_temperature)
        if k is not None and vocab_size is not None:
            check_temperatures(tail, cfg.loss.temperature, cache_temperature, k, vocab_size,
                               cross_tokenizer=bool(getattr(cfg.loss, "cross_tokenizer", None)))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for w in warns:
        warnings.warn(w, stacklevel=2)
    if "tail" in cfg.loss.model_fields_set:
        return cfg
    loss = cfg.loss.model_copy(update={"tail": tail})
    loss.model_fields_set.add("tail")
    return cfg.model_copy(update={"loss": loss})


@dataclass
class LossSums:
    """Per-micro-batch loss terms.

    Attributes:
        loss_sum: scalar float32 with grad, ``α Σ CE + (1-α) τ² Σ D`` over valid positions.
        ce_sum, kl_sum: (S,) float32 per-sample sums (nats), detached; ``kl_sum`` is forward KL
            whatever the configured divergence.
        distill_sum: (S,) float32 per-sample sums of the configured divergence ``D`` (nats),
            detached; ``kl_sum`` itself for forward KL (the default when not given).
        top1_agree: (S,) int64 positions where the student's largest logit is at the teacher's
            top-1 id (0 without teacher targets).
        named: extra terms reported by name, each a detached scalar float32 *sum over the
            micro-batch's valid positions* (a per-position mean times ``n_valid``), e.g. the
            router losses ``router_z_loss``; the trainer divides their step totals by N.
    """

    loss_sum: torch.Tensor
    ce_sum: torch.Tensor
    kl_sum: torch.Tensor
    top1_agree: torch.Tensor
    named: dict[str, torch.Tensor] = field(default_factory=dict)
    distill_sum: torch.Tensor | None = None

    def __post_init__(self):
        if self.distill_sum is None:
            self.distill_sum = self.kl_sum


def auto_chunk_size(vocab_size: int, temperature: float, budget_bytes: int = AUTO_CHUNK_BYTES) -> int:
    """Positions per chunk of :func:`fused_linear_loss` so its float32 ``(chunk, V)`` temporaries
    fit ``budget_bytes`` (one buffer at τ = 1, two at τ ≠ 1; :func:`~pipeline.student.fused_driver.chunk_rows`);
    at least 1."""
    return chunk_rows(vocab_size, 1 if temperature == 1.0 else 2, budget_bytes)


def teacher_log_probs(lp: torch.Tensor, tail_lp: torch.Tensor, ratio: float, tail: str
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher's target log-probabilities at the training temperature τ, from the cached
    values at the cache temperature ``T_c`` (DESIGN.md, Loss).

    The cache holds ``lp = log_softmax(z/T_c)`` at the support ids, so on those ids
    ``log p_τ = ratio · lp − log Σ_V exp(ratio · lp)`` with ``ratio = T_c / τ``: re-tempering is
    a multiplication by ``ratio``, never a second division by τ.

    * ``sampled``: ``lp`` unchanged (an estimate of ``p`` at ``T_c`` is never re-tempered).
    * ``renormalize``: ``softmax(ratio · lp)`` over the live support: exactly the teacher's
      distribution at τ restricted to S and renormalised.
    * ``bucket``: at ``ratio == 1`` the support plus the tail outcome, normalised together
      (the cached values and tail already sum to 1; normalising absorbs the codec's rounding):
      exact. At ``ratio != 1`` the tempered tail mass needs the whole vocabulary, which the cache
      does not hold: the caller must have the full vocabulary as support (``k = V``), and the
      tail (rounding only) is dropped — then it is exact too. :func:`fused_linear_loss` refuses
      the partial-support case.

    Args:
        lp: (n, k) cached log-probabilities (``-inf`` = padding slot). tail_lp: (n,) cached
            tail log-mass. ratio: ``T_c / τ`` (> 0). tail: the tail mode.
    Returns:
        ``log_p`` (n, k) (``-inf`` kept at padding slots) and ``log_p_tail`` (n,) for
        ``bucket`` at ``ratio == 1``, else None.
    """
    if tail == "sampled":
        return lp, None
    lpt = lp * ratio if ratio != 1.0 else lp
    if tail == "bucket" and ratio == 1.0:
        zz = torch.logsumexp(torch.cat([lpt, tail_lp[:, None]], -1), -1)  # (n,)
        return lpt - zz[:, None], tail_lp - zz
    return lpt - torch.logsumexp(lpt, -1, keepdim=True), None


def _kl_terms(zS: torch.Tensor, lse_t: torch.Tensor, log_p: torch.Tensor, log_p_tail: torch.Tensor | None,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL values and the coefficients of its logit gradient for one chunk (module docstring).

    Args:
        zS: (n, k) student logits at the support ids (temperature 1). lse_t: (n,) ``logsumexp(z/τ)``.
        log_p: (n, k) teacher log-probabilities at τ (``-inf`` = padding; :func:`teacher_log_probs`).
        log_p_tail: (n,) the tail outcome's log-probability (``bucket``), or None (no tail outcome).
    Returns:
        kl (n,), A (n,), B (n, k): ``∂KL/∂(z/τ) = A q_τ − scatter_S(B)``.
    """
    live = ~torch.isneginf(log_p)
    log_qS = zS / temperature - lse_t[:, None]  # (n, k) log q_τ at the support
    safe = torch.where(live, log_p, 0.0)
    p = torch.where(live, safe.exp(), 0.0)  # (n, k)
    kl = (p * (safe - log_qS)).sum(-1)
    A, B = p.sum(-1), p
    if log_p_tail is not None:
        p_tail = log_p_tail.exp()
        lse_S = torch.logsumexp(torch.where(live, log_qS, -torch.inf), -1)  # log Σ_S q
        # q_tail = 1 - Σ_S q, clamped so a student with all its mass on S gives a finite log
        log_q_tail = log1mexp(lse_S.clamp(max=-1e-6))
        has_tail = p_tail > 0
        kl = kl + torch.where(has_tail, p_tail * (torch.where(has_tail, log_p_tail, 0.0) - log_q_tail), 0.0)
        r = torch.where(has_tail & (lse_S <= -1e-6), p_tail / log_q_tail.exp(), 0.0)  # (n,)
        A = A - r * lse_S.exp()
        B = B - r[:, None] * torch.where(live, log_qS.exp(), 0.0)
    return kl, A, B


def _divergence_terms(zS: torch.Tensor, lse_t: torch.Tensor, log_p: torch.Tensor, log_p_tail: torch.Tensor | None,
                      temperature: float, div: Divergence) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A divergence other than forward KL for one chunk: its value and the coefficients of its
    logit gradient, ``∂D/∂(z/τ) = A q_τ − scatter_S(B)`` (the form of :func:`_kl_terms`).

    The categories (pipeline/student/divergences.py) are the live cached ids, plus the tail
    outcome for ``bucket``. With ``g = ∂D/∂log q_c`` from
    :func:`~pipeline.student.divergences.category_terms`, ``u = z/τ``, ``Q_S = Σ_S q``:

    * with a tail outcome (``log q_i = u_i − lse(u)``, ``log q_tail = log(1 − Q_S)``):
      ``A = −Σ_S g + (g_tail / q_tail) Q_S``, ``B = −g_S + (g_tail / q_tail) q_S``
      (``g_tail / q_tail`` taken as 0 where ``q_tail`` is clamped, as in :func:`_kl_terms`);
    * without (``renormalize``: ``log q̃_i = u_i − log Q_S``, independent of the other logits):
      ``A = 0``, ``B = −(g − q̃ Σ_S g)``.

    Args: as :func:`_kl_terms`; ``div`` the divergence (not ``forward_kl``).
    Returns:
        ``D`` (n,), ``A`` (n,), ``B`` (n, k).
    """
    live = ~torch.isneginf(log_p)
    log_qS = torch.where(live, zS / temperature - lse_t[:, None], -torch.inf)  # (n, k) log q_τ at the support
    lse_S = torch.logsumexp(log_qS, -1)  # log Q_S
    if log_p_tail is None:
        log_qn = log_qS - lse_S[:, None]
        d, g = category_terms(log_p, log_qn, live, div)
        B = -(g - torch.where(live, log_qn.exp(), 0.0) * g.sum(-1, keepdim=True))
        return d, torch.zeros_like(d), B
    log_pc = torch.cat([log_p, log_p_tail[:, None]], -1)  # (n, k+1)
    ok = lse_S <= -1e-6  # q_tail = 1 − Q_S, clamped as in _kl_terms
    log_q_tail = log1mexp(lse_S.clamp(max=-1e-6))
    log_q = torch.cat([log_qS, log_q_tail[:, None]], -1)
    live_c = torch.cat([live, ~torch.isneginf(log_p_tail)[:, None]], -1)
    d, g = category_terms(log_pc, log_q, live_c, div)
    g_S, g_t = g[:, :-1], g[:, -1]
    r = torch.where(ok & live_c[:, -1], g_t / log_q_tail.exp(), 0.0)  # (n,) g_tail / q_tail
    A = -g_S.sum(-1) + r * lse_S.exp()
    B = -g_S + r[:, None] * torch.where(live, log_qS.exp(), 0.0)
    return d, A, B


def _hybrid_terms(targets: LossTargets, alpha: float, temperature: float, tail: str, div: Divergence, ratio: float,
                  out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> ChunkTerms:
    """The chunk terms of :func:`fused_linear_loss` for :func:`~pipeline.student.fused_driver.fused_output_loss`:
    per chunk of logits ``z`` (n, V), CE, the forward KL (and the configured ``D``), top-1
    agreement written into ``out = (ce, kl, dist, agree)`` (N,), the chunk's
    ``α Σ CE + (1−α) τ² Σ D`` and ``∂/∂z = α (q1 − onehot(y)) + (1−α) τ (A q_τ − scatter(B))``
    (module docstring), formed in ``z``'s storage."""
    ce, kl, dist, agree = out
    tau, w_kl, with_kl = temperature, (1.0 - alpha) * temperature**2, alpha < 1.0
    forward_kl = div.name == "forward_kl"
    labels = targets.labels

    def terms(z: torch.Tensor, s: int, e: int, need_grad: bool):
        y = labels[s:e, None]
        zmax = z.amax(-1, keepdim=True)  # (n, 1)
        zy = z.gather(1, y).squeeze(1)
        if with_kl:
            ids = targets.topk_ids[s:e]
            zS = z.gather(1, ids)  # (n, k)
            agree[s:e] = zS[:, 0] >= zmax[:, 0]
            if tau != 1.0:  # q_τ in its own buffer, normalised below
                qt = (z / tau).sub_(zmax / tau).exp_()
                st = qt.sum(-1)
                lse_t = zmax[:, 0] / tau + st.log()
        q = z.sub_(zmax).exp_()  # (n, V) exp(z - max), in place of the logits
        s1 = q.sum(-1)
        lse1 = zmax[:, 0] + s1.log()
        ce[s:e] = lse1 - zy
        if not with_kl:
            loss = ce[s:e].sum()
        else:
            if tau == 1.0:
                lse_t = lse1
            log_p, log_p_tail = teacher_log_probs(targets.topk_logprobs[s:e].to(z.dtype),
                                                  targets.tail_logprob[s:e].to(z.dtype), ratio, tail)
            kl_c, A, Bk = _kl_terms(zS, lse_t, log_p, log_p_tail, tau)
            kl[s:e] = kl_c
            if not forward_kl:  # the KL above stays the logged kl; D and its gradient replace it
                dist[s:e], A, Bk = _divergence_terms(zS, lse_t, log_p, log_p_tail, tau, div)
            loss = alpha * ce[s:e].sum() + w_kl * dist[s:e].sum()
        if not need_grad:
            return loss, None
        if with_kl and tau == 1.0:
            q.mul_(((alpha + w_kl / tau * A) / s1)[:, None])
        else:
            q.mul_((alpha / s1)[:, None])
            if with_kl:
                q.add_(qt.mul_((w_kl / tau * A / st)[:, None]))
        q.scatter_add_(1, y, torch.full_like(y, -alpha, dtype=q.dtype))
        if with_kl:
            q.scatter_add_(1, ids, -(w_kl / tau) * Bk)
        return loss, q

    return terms


def fused_linear_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: LossTargets, *,
                      alpha: float, temperature: float = 1.0, tail: str = "bucket", vocab_size: int | None = None,
                      chunk_size: int = 0, divergence: Divergence | None = None,
                      cache_temperature: float = 1.0, softcap: float | None = None) -> LossSums:
    """The hybrid sum-reduced loss of the valid positions, fused with the output projection.

    ``logits = hidden @ weight[:V].T (+ bias[:V])`` are formed one chunk of positions at a
    time and never kept; the gradients with respect to ``hidden``, ``weight`` and ``bias`` are
    computed in the same pass and scaled by the incoming gradient in the backward pass (module
    docstring), so the output projection's all-gathered weight is used once per micro-step. The
    chunk loop, its precision and its chunk size: :mod:`pipeline.student.fused_driver`.

    Args:
        hidden: (N, H) final hidden states of the valid positions (float32, or bf16 / fp16 under
            mixed precision; the logits, the softmax, the sums and the weight gradient are float32).
        weight: (V_out, H) output projection (the tied input embedding, or ``lm_head.weight``);
            ``V_out >= vocab_size`` (a padded output layer's extra rows get zero gradient).
        bias: (V_out,) or None.
        targets: :class:`LossTargets` of the same N positions.
        alpha: CE weight in [0, 1]; teacher targets may be None when ``alpha == 1``.
        temperature: τ > 0; CE is always at temperature 1.
        tail: ``renormalize``, ``bucket`` or ``sampled`` (module docstring).
        vocab_size: V, the data's vocabulary (default ``V_out``).
        chunk_size: positions per chunk; 0 = :func:`auto_chunk_size` (``AUTO_CHUNK_BYTES``; one
            more buffer with ``softcap``).
        divergence: the distillation term ``D`` (pipeline/student/divergences.py); None:
            forward KL. The loss is ``α Σ CE + (1−α) τ² Σ D``; ``kl_sum`` stays forward KL.
        cache_temperature: ``T_c``, the temperature the cached values were written at (the
            manifest's ``temperature``): they are re-tempered by ``T_c / τ``
            (:func:`teacher_log_probs`).
        softcap: ``c`` of the student's logit soft-cap ``z ← c · tanh(z / c)``
            (``OutputProjection.softcap``), applied to the projected logits before the loss; None:
            no cap.
    Returns:
        :class:`LossSums` (per-sample sums over ``targets.n_samples`` samples).
    Raises:
        ValueError: ``alpha < 1`` without teacher targets; ``vocab_size`` above ``V_out``; an
            unknown ``tail``; a divergence other than forward KL with ``tail="sampled"`` (its
            estimator is unbiased for the forward-KL gradient only); ``tail="bucket"`` at
            ``τ ≠ T_c`` with fewer than V cached ids per position (the tempered tail mass is not
            in the cache: :func:`check_temperatures`).
    """
    V = weight.shape[0] if vocab_size is None else vocab_size
    if V > weight.shape[0]:
        raise ValueError(f"vocab_size {V} exceeds the output layer's {weight.shape[0]} rows")
    if tail not in TAIL_MODES:
        raise ValueError(f"loss.tail must be one of {TAIL_MODES}, got {tail!r}")
    div = divergence if divergence is not None else Divergence()
    if tail == "sampled" and div.name != "forward_kl":
        raise ValueError(f"loss.divergence={div.name} needs loss.tail bucket or renormalize: the sampled "
                         "estimator is unbiased for the forward-KL gradient only")
    with_kl = alpha < 1.0
    if with_kl and (targets.topk_ids is None or targets.topk_logprobs is None or targets.tail_logprob is None):
        raise ValueError("alpha < 1 needs teacher targets (topk_ids, topk_logprobs, tail_logprob)")
    if with_kl:
        check_temperatures(tail, temperature, cache_temperature, targets.topk_ids.shape[-1], V)
    N, fdt = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)  # float32 (float64 in tests)
    ce = torch.zeros(N, dtype=fdt, device=hidden.device)
    kl = torch.zeros_like(ce)
    dist = kl if div.name == "forward_kl" else torch.zeros_like(ce)  # the configured divergence per position
    agree = torch.zeros(N, dtype=torch.bool, device=hidden.device)
    terms = _hybrid_terms(targets, float(alpha), float(temperature), tail, div,
                          float(cache_temperature) / float(temperature), (ce, kl, dist, agree))
    loss = fused_output_loss(hidden, weight, bias, terms, vocab_size=V, chunk_size=chunk_size,
                             buffers=1 if temperature == 1.0 else 2, softcap=softcap)
    S, idx = targets.n_samples, targets.sample_index

    def per_sample(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(S, dtype=dtype, device=hidden.device).index_add_(0, idx, x.to(dtype))

    kl_sum = per_sample(kl)
    return LossSums(loss, per_sample(ce), kl_sum, per_sample(agree, torch.int64),
                    distill_sum=kl_sum if div.name == "forward_kl" else per_sample(dist))
