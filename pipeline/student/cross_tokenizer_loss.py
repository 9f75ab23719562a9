"""Cross-tokenizer losses (``loss.cross_tokenizer``), fused with the output projection like
:func:`pipeline.student.losses.fused_linear_loss`: the logits exist one chunk of positions at a
time, no ``(B, T, V)`` or ``(N, V)`` tensor.

The targets come from :mod:`pipeline.student.cross_tokenizer`: at every student valid position
the CE on the student's own next token; at the positions aligned with a teacher position the
teacher's top-k ``p`` (re-tempered with the tail as one outcome, as ``loss.tail: bucket``:
``p = softmax([log p_S, log p_tail] / τ)``), of which the slots in ``M`` have a student id
``m(i)``; ``U`` are the other live slots. With ``q = softmax(z / τ)`` over the student vocabulary::

    loss_sum = α Σ_t CE_t + (1 − α) τ² Σ_{t aligned} D_t

* ``gold`` (TRL's GOLD trainer, ``ULDLoss._compute_hybrid_uld_loss``: an exact vocabulary
  mapping for the tokens both vocabularies share, ULD for the rest)::

      D_t = KL_M + ULD_U
      KL_M = Σ_{i∈M} p_i (log p_i − log q_{m(i)}) + p_R (log p_R − log q_R)
             p_R = 1 − Σ_{i∈M} p_i,  q_R = 1 − Σ_{i∈M} q_{m(i)}
      ULD_U = Σ_{j=1}^{|U|} | p^U_(j) − q^{¬m(M)}_(j) |

  ``KL_M`` is the KL between the (|M|+1)-outcome coarsenings of ``p`` and ``q`` (the mapped ids
  and one outcome for everything else: what ``loss.tail: bucket`` computes with ``M`` as the
  support, so with identical tokenizers it is that loss exactly). ``ULD_U`` compares the
  unmapped teacher probabilities, sorted, with the student's largest probabilities outside the
  mapped ids, sorted: the L1 form of the Universal Logit Distillation loss (Boizard et al.,
  "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs",
  2024, eq. 4: ``Σ_j |p_(j) − q_(j)|`` over the sorted probability vectors, which for sorted
  vectors equals the 1-Wasserstein distance between them). GOLD weights its two parts by the
  vocabulary overlap; here both have weight 1 (the KL already carries the unmapped mass
  through ``p_R``). Only the cached slots of ``U`` are compared (the tail's split over ids is
  unknown).
* ``uld`` (Boizard et al. 2024, eq. 4, on the cached slots)::

      D_t = Σ_{j=1}^{|S|} | p_(j) − q_(j) | + | p_tail − (1 − Σ_{j=1}^{|S|} q_(j)) |

  with ``S`` all live slots and ``q_(j)`` the student's ``|S|`` largest probabilities; the
  teacher's tail and the student's rest are compared as one outcome each. No id is mapped.

Merging multi-token spans: each GOLD alignment group is scored once, at the position before
its first token (GOLD's ``observed`` strategy). GOLD multiplies that distribution by the
probabilities of the group's later actual tokens; that scalar is dropped here: on the teacher
side the cache holds it only when those tokens are in its top-k, and on the student side it
would only add the CE of those tokens, which ``α CE`` already trains.

Gradients (``u = z / τ``; ``∂q_c/∂u = q_c (e_c − q)``), in the ``A q − scatter(B)`` form of
:mod:`pipeline.student.losses`: ``KL_M`` as ``loss.tail: bucket`` with support ``m(M)``
(:func:`pipeline.student.losses._kl_terms`); a sorted-L1 term ``Σ_j g_j q_{c_j}`` with
``g_j = sign(q_(j) − p_(j))`` at the student ids ``c_j`` of ``q_(j)`` (and, for ``uld``, ``−s``
added to every ``g_j``, ``s = sign(1 − Σ_j q_(j) − p_tail)``) has ``∂/∂u = scatter(c, g q_c) − (Σ_j
g_j q_{c_j}) q``. The sort itself is piecewise constant (as in ULD's autograd implementation).
"""
from __future__ import annotations

import torch

from pipeline.data.batch import LossTargets
from pipeline.student.fused_driver import ChunkTerms, fused_output_loss
from pipeline.student.losses import LossSums, _kl_terms, check_temperatures, teacher_log_probs

MODES = ("gold", "uld")


def _sorted_l1(qt: torch.Tensor, p_sel: torch.Tensor, count: torch.Tensor, exclude: torch.Tensor | None,
               tail: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sorted-probability L1 distance of one chunk and its gradient coefficients.

    Args:
        qt: (n, V) student probabilities at τ. p_sel: (n, k) teacher probabilities of the
            compared slots in descending order, the others set to -1 (sorted last).
        count: (n,) int64 compared slots per position. exclude: ``(ids (n, k) int64, flags (n, k)
            bool)``: the student ids ``ids[flags]`` are left out of the student's vector; or None.
        tail: ``(p_tail (n,), live (n,) bool)`` to add the tail-vs-rest term, or None.
    Returns:
        ``d`` (n,), ``A`` (n,), ``cols`` (n, k) student ids, ``B`` (n, k), with
        ``∂d/∂u = A q − scatter(cols, B)``.
    """
    n, k = p_sel.shape
    if exclude is None:
        q = qt
    else:  # the mapped student ids sort last (amin: an unmapped slot's id 0 never undoes a mapped id 0)
        src = torch.where(exclude[1], -1.0, torch.inf).to(qt.dtype)
        q = qt.scatter_reduce(1, exclude[0], src, "amin")
    vals, cols = q.topk(k, dim=-1)  # (n, k) descending
    live = torch.arange(k, device=qt.device)[None, :] < count[:, None]
    t = p_sel.sort(dim=-1, descending=True).values
    diff = torch.where(live, vals - t, 0.0)
    d = diff.abs().sum(-1)
    g = torch.where(live, torch.sign(diff), 0.0)
    if tail is not None:
        p_tail, has = tail
        rest = 1.0 - torch.where(live, vals, 0.0).sum(-1)
        d = d + torch.where(has, (rest - p_tail).abs(), 0.0)
        s = torch.where(has, torch.sign(rest - p_tail), 0.0)
        g = torch.where(live, g - s[:, None], 0.0)
    gq = g * torch.where(live, vals, 0.0)  # (n, k) g_j q_{c_j}
    return d, -gq.sum(-1), cols, -gq


def _chunk_terms(z: torch.Tensor, lse_t: torch.Tensor, qt: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor,
                 tail_lp: torch.Tensor, mapped: torch.Tensor, temperature: float, mode: str):
    """Per-position ``D``, the mapped KL, and the gradient coefficients of one chunk's aligned
    positions (module docstring). Returns ``(d, kl, A, [(cols, B), ...])`` with
    ``∂d/∂u = A q − Σ scatter(cols, B)``."""
    live = ~torch.isneginf(lp)
    log_p, log_pt = teacher_log_probs(lp, tail_lp, 1.0, "bucket")  # τ = T_c (cross_tokenizer_loss)
    p = torch.where(live, log_p.exp(), 0.0)
    # KL_M: the bucket KL with support m(M)
    rest = torch.cat([torch.where(live & ~mapped, log_p, -torch.inf), log_pt[:, None]], -1)
    log_pr = torch.logsumexp(rest, -1)  # log p_R: unmapped slots + tail
    lp_m = torch.where(mapped, log_p, -torch.inf)
    kl, A_kl, B_kl = _kl_terms(z.gather(1, ids), lse_t, lp_m, log_pr, temperature)
    if mode == "gold":
        unm = live & ~mapped
        d_u, A_u, cols, B_u = _sorted_l1(qt, torch.where(unm, p, -1.0), unm.sum(-1), (ids, mapped), None)
        return kl + d_u, kl, A_kl + A_u, [(ids, B_kl), (cols, B_u)]
    d_u, A_u, cols, B_u = _sorted_l1(qt, torch.where(live, p, -1.0), live.sum(-1), None,
                                     (log_pt.exp(), ~torch.isneginf(log_pt)))
    return d_u, kl, A_u, [(cols, B_u)]


def _cross_terms(t: LossTargets, alpha: float, temperature: float, mode: str,
                 out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]) -> ChunkTerms:
    """The chunk terms of :func:`cross_tokenizer_loss` for :func:`~pipeline.student.fused_driver.fused_output_loss`:
    per chunk of logits ``z`` (n, V), CE at every position and ``D`` at the aligned ones, written
    into ``out = (ce, kl, dist, agree)`` (N,), the chunk's ``α Σ CE + (1 − α) τ² Σ D`` and its
    logit gradient (module docstring), formed in ``z``'s storage."""
    ce, kl, dist, agree = out
    tau, w = temperature, (1.0 - alpha) * temperature**2

    def terms(z: torch.Tensor, s: int, e: int, need_grad: bool):
        y = t.labels[s:e, None]
        lse1 = torch.logsumexp(z, -1)
        ce[s:e] = lse1 - z.gather(1, y).squeeze(1)
        al = t.aligned[s:e]
        rows = al.nonzero().squeeze(1) if alpha < 1.0 else al[:0].nonzero().squeeze(1)
        if len(rows):
            za = z[rows]  # (m, V)
            lse_t = lse1[rows] if tau == 1.0 else torch.logsumexp(za / tau, -1)
            qt = (za / tau if tau != 1.0 else za.clone()).sub_(lse_t[:, None]).exp_()  # (m, V) q_τ
            ids, lp, tl, mp = t.topk_ids[s:e][rows], t.topk_logprobs[s:e][rows].to(z.dtype), \
                t.tail_logprob[s:e][rows].to(z.dtype), t.mapped[s:e][rows]
            d, k_m, A, parts = _chunk_terms(za, lse_t, qt, ids, lp, tl, mp, tau, mode)
            dist[s + rows], kl[s + rows] = d, k_m
            top_mapped = mp[:, 0] & ~torch.isneginf(lp[:, 0])
            agree[s + rows] = top_mapped & (za.gather(1, ids[:, :1]).squeeze(1) >= za.amax(-1))
            del za
        loss = alpha * ce[s:e].sum() + w * dist[s:e].sum()
        if not need_grad:
            return loss, None
        grad = z.sub_(lse1[:, None]).exp_().mul_(alpha)  # α softmax(z), in place of the logits
        grad.scatter_add_(1, y, torch.full_like(y, -alpha, dtype=z.dtype))  # α ∂CE/∂z
        if len(rows):
            ga = qt.mul_(A[:, None])  # q_τ is not read after _chunk_terms
            for cols, B in parts:
                ga.scatter_add_(1, cols, -B)
            grad.index_add_(0, rows, (w / tau) * ga)  # (1−α) τ² · (1/τ) ∂D/∂u
        return loss, grad

    return terms


CHUNK_BUFFERS = 4
"""Float32 ``(chunk, V)`` temporaries of one chunk of :func:`_cross_terms` alive at once: the
logits, the aligned rows' copy, their ``q_τ``, and the student vector :func:`_sorted_l1` sorts."""


def cross_tokenizer_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: LossTargets, *,
                         alpha: float, temperature: float = 1.0, mode: str = "gold", vocab_size: int | None = None,
                         chunk_size: int = 0, cache_temperature: float | None = None,
                         softcap: float | None = None) -> LossSums:
    """The cross-tokenizer hybrid loss of the valid positions, fused with the output projection.

    Args:
        hidden: (N, H) final hidden states of the student's valid positions.
        weight: (V_out, H) output projection; bias: (V_out,) or None.
        targets: :class:`LossTargets` with ``aligned`` (N,) bool and ``mapped`` (N, k) bool
            (:class:`~pipeline.student.cross_tokenizer.CrossTokenizerRecord` collated): teacher
            targets count at aligned positions only; ``topk_ids`` are student ids.
        alpha: CE weight in [0, 1]. temperature: τ > 0 (CE at 1). mode: ``gold`` | ``uld``.
        vocab_size: the student's data vocabulary (default ``V_out``).
        chunk_size: positions per chunk; 0: :func:`~pipeline.student.fused_driver.chunk_rows` of V
            and :data:`CHUNK_BUFFERS` (the chunk loop and its precision: :mod:`pipeline.student.fused_driver`).
        cache_temperature: ``T_c`` of the cached values (default: ``temperature``). The teacher
            side is a bucket over the cached slots, so only ``τ = T_c`` is exact.
        softcap: ``c`` of the student's logit soft-cap ``z ← c · tanh(z / c)``, or None.
    Returns:
        :class:`LossSums`: ``kl_sum`` is ``KL_M`` (the mapped-ids KL, also under ``uld``, where
        it is not trained), ``distill_sum`` the trained ``D``, ``top1_agree`` counts aligned
        positions whose student argmax is the teacher's mapped top-1.
    Raises:
        ValueError: an unknown ``mode``; targets without ``aligned`` / ``mapped``; ``τ ≠ T_c``
            (:func:`~pipeline.student.losses.check_temperatures`).
    """
    if mode not in MODES:
        raise ValueError(f"loss.cross_tokenizer must be one of {MODES}, got {mode!r}")
    if targets.aligned is None or targets.mapped is None:
        raise ValueError("cross-tokenizer loss: the targets have no aligned/mapped positions (not a "
                         "cross-tokenizer batch)")
    V = weight.shape[0] if vocab_size is None else vocab_size
    if alpha < 1.0 and cache_temperature is not None:
        check_temperatures("bucket", temperature, cache_temperature, 0, 1, cross_tokenizer=True)
    N, fdt = hidden.shape[0], torch.promote_types(hidden.dtype, torch.float32)  # float32 (float64 in tests)
    ce, kl, dist = (torch.zeros(N, dtype=fdt, device=hidden.device) for _ in range(3))
    agree = torch.zeros(N, dtype=torch.bool, device=hidden.device)
    terms = _cross_terms(targets, float(alpha), float(temperature), mode, (ce, kl, dist, agree))
    loss = fused_output_loss(hidden, weight, bias, terms, vocab_size=V, chunk_size=chunk_size,
                             buffers=CHUNK_BUFFERS, softcap=softcap)
    S, idx = targets.n_samples, targets.sample_index

    def per_sample(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        return torch.zeros(S, dtype=dtype, device=hidden.device).index_add_(0, idx, x.to(dtype))

    return LossSums(loss, per_sample(ce), per_sample(kl), per_sample(agree, torch.int64), distill_sum=per_sample(dist))
