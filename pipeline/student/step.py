"""One optimizer step over all micro-batches of an accumulation window, and evaluation.

Sum, count, normalise once (DESIGN.md, Loss): the valid positions of the whole step are
counted over all micro-batches and ranks *before* the backward passes; every micro-batch
back-propagates ``loss_sum / N``; FSDP's gradient averaging is off (``shard_model``), so the
gradient is ``∇(Σ loss_sum) / N`` whatever the micro-batch size, accumulation and world size.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from pipeline.config import LossConfig, OptimConfig
from pipeline.distributed import all_reduce_sum, set_gradient_sync
from pipeline.data.batch import Batch
from pipeline.student.divergences import Divergence
from pipeline.student.cross_tokenizer_loss import cross_tokenizer_loss
from pipeline.student.losses import LossSums, fused_linear_loss
from pipeline.models import defer_output_projection
from pipeline.student.packed_attention import enable_packed_attention
from pipeline.student.router_losses import ROUTER_TERMS, router_losses, router_top_k


@dataclass
class StepStats:
    """Global (all-reduced) totals of a step or an evaluation, plus this rank's sample rows.

    ``loss``, ``ce``, ``kl``, ``distill`` are per valid token: ``Σ loss_sum / N`` etc.
    (``kl`` forward KL, ``distill`` the configured divergence). ``rows`` holds one dict of
    lists (``sample_id, n_tokens, ce_sum, kl_sum, distill_sum, loss_sum, top1_agree,
    topk_mass_sum, teacher_entropy_sum, aligned_frac, mapped_mass``; the last two None
    outside cross-tokenizer runs) for this rank's samples.
    """

    loss: float
    ce: float
    kl: float
    distill: float
    n_tokens: int
    grad_norm: float | None = None
    rows: dict[str, list] = field(default_factory=dict)
    stop: bool = False
    """True on every rank when any rank passed ``stop_requested`` to the step."""
    nonfinite: bool = False
    """The step's loss or gradient norm was NaN/inf (on any rank): the optimizer step was skipped."""
    nonfinite_sample_ids: list[str] = field(default_factory=list)
    """This rank's samples with a non-finite CE/KL sum in that step (all its samples when only
    the gradient norm was non-finite)."""
    named: dict[str, float] = field(default_factory=dict)
    """Extra loss terms per valid token over the step (all ranks), e.g. ``router_z_loss``."""
    overflow: bool = False
    """fp16 loss scaling: the scaled gradients overflowed (on any rank) while the loss was finite;
    the optimizer step was skipped and the loss scale lowered. Not ``nonfinite``."""
    loss_scale: float | None = None
    """fp16 loss scaling: the scale this step's loss was multiplied by (None without scaling)."""
    overflow_steps: int = 0
    """fp16 loss scaling: overflow-skipped steps so far in this round (restored on resume)."""
    consecutive_overflows: int = 0
    """fp16 loss scaling: overflow-skipped steps in a row up to this one (0 after a step that did
    not overflow; restored on resume)."""

    def metrics(self, split: str) -> dict[str, float]:
        """The optional metrics under their logged names: ``{split}/{name}`` for :attr:`named`
        (e.g. ``train/router_load_balance``) and, with loss scaling, ``train/loss_scale`` and
        ``train/overflow_steps``."""
        out = {f"{split}/{k}": v for k, v in self.named.items()}
        if self.loss_scale is not None:
            out[f"{split}/loss_scale"] = self.loss_scale
            out[f"{split}/overflow_steps"] = self.overflow_steps
        return out


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over parameter groups.

    A parameter joins the first ``cfg.param_groups`` entry whose ``pattern`` matches its name
    (``re.search``), taking that entry's ``lr`` / ``weight_decay`` where set, else the defaults.
    Matrices (ndim >= 2) get weight decay; norms and biases (ndim < 2) never do.

    Raises:
        ValueError: a ``param_groups`` pattern that matches no parameter (names the pattern).
    """
    groups: dict[tuple[int, bool], dict] = {}
    used = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        idx = next((i for i, g in enumerate(cfg.param_groups) if re.search(g.pattern, name)), -1)
        spec = cfg.param_groups[idx] if idx >= 0 else None
        used.add(idx)
        decay = p.ndim >= 2
        g = groups.setdefault((idx, decay), {
            "params": [], "lr": spec.lr if spec and spec.lr is not None else cfg.lr,
            "weight_decay": (spec.weight_decay if spec and spec.weight_decay is not None else cfg.weight_decay) if decay else 0.0})
        g["params"].append(p)
    for i, g in enumerate(cfg.param_groups):
        if i not in used:
            raise ValueError(f"optim.param_groups[{i}].pattern {g.pattern!r} matches no parameter")
    # foreach: a handful of multi-tensor ops per step instead of ~10 per parameter (each a DTensor
    # dispatch under FSDP2); torch already defaults to it on CUDA
    return torch.optim.AdamW(list(groups.values()), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, foreach=True)


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Multiplier of the base LR at optimizer step s (0-based): linear warmup over
    ``warmup_steps``, then cosine / linear decay to ``min_lr_ratio`` at ``max_steps``, or constant."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


@torch.no_grad()
def check_packing(trainer: "Trainer", vocab_size: int, tol: float = 1e-4) -> None:
    """Refuse ``data.packing`` for a student whose attention crosses packed samples.

    Two probe samples (5 and 7 tokens) are scored packed in one row and one per row; their
    losses must agree within ``tol`` (relative): an attention implementation that ignores the
    restarting ``position_ids`` lets the second sample attend to the first and fails.
    Collective (every rank runs the same forwards).

    Raises:
        ValueError: the losses differ (names ``data.packing`` and the model class).
    """
    from pipeline.data import Sample
    from pipeline.data.batch import collate

    def probe(sid: str, n: int, seed: int) -> Sample:
        ids = np.random.default_rng(seed).integers(0, vocab_size, n).astype(np.int32)
        return Sample(sid, ids, np.ones(n, dtype=bool))

    recs = [probe("a", 5, 0), probe("b", 7, 1)]
    was_training, loss_cfg = trainer.model.training, trainer.loss_cfg
    trainer.model.eval()
    trainer.loss_cfg = loss_cfg.model_copy(update={"alpha": 1.0, "aux_loss_coef": 0.0})  # CE only: no teacher
    try:
        got = [trainer._loss(collate(recs, pack_length=pl).to(trainer.device)).ce_sum.cpu() for pl in (None, 16)]
    finally:
        trainer.model.train(was_training)
        trainer.loss_cfg = loss_cfg
    if not torch.allclose(got[0], got[1], rtol=tol, atol=0.0):
        raise ValueError(f"data.packing: {type(trainer.model).__name__}'s attention does not confine each packed sample "
                         f"to itself (per-sample CE {got[0].tolist()} unpacked vs {got[1].tolist()} packed); "
                         "use data.packing: false or an attention implementation that honours position_ids")


class Trainer:
    """Runs optimizer steps and evaluations of a (FSDP2-wrapped) causal LM.

    The model's output layer is replaced by :class:`pipeline.models.OutputProjection`
    (:func:`~pipeline.models.defer_output_projection`, which must run before ``fully_shard``;
    the Trainer applies it to an unwrapped model itself): the forward pass returns the final
    hidden states and :func:`pipeline.student.losses.fused_linear_loss` projects and scores the valid
    positions chunk by chunk, so no ``(B, T, V)`` logits exist.

    Host synchronisation: one per optimizer step (the step's totals, gradient norm and
    per-sample rows leave the device in one transfer); the valid-token counts come from the
    host-side batches.

    Args:
        model: the student, already wrapped by ``pipeline.distributed.shard_model``, or the
            plain module (one rank; ``pipeline.student.loop.uses_fsdp``).
        loss_cfg: α, τ, tail mode, chunk size.
        max_grad_norm: clip threshold on the global L2 norm (None: no clipping).
        device: where batches go.
        vocab_size: the data's vocabulary V; a student whose output layer is padded beyond it
            scores only the first V rows (padding rows get no probability mass).
        packing: batches may hold packed rows (``data.packing``): the student's attention is
            prepared by :func:`pipeline.student.packed_attention.enable_packed_attention`.
        loss_scaling: dynamic loss scaling for fp16 compute (``mixed_precision: fp16``): a
            ``torch.amp.GradScaler`` for ``device``'s type, default settings (initial scale 2^16,
            halved on overflow, doubled after 2000 clean steps). See :meth:`train_step`.
        cache_temperature: ``T_c``, the temperature the train cache was written at (its
            manifest's ``temperature``; 1, the stage-1 default).
    Raises:
        TypeError: an FSDP-wrapped model whose output layer was not deferred before wrapping.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loss_cfg: LossConfig,
                 max_grad_norm: float | None, device: torch.device, vocab_size: int | None = None,
                 packing: bool = False, loss_scaling: bool = False, cache_temperature: float = 1.0):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.head = defer_output_projection(model)
        # the root's output is a view of the hidden states (transformers slices them for the
        # output layer); the loss only reads it out of place, so FSDP2's warning does not apply
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        self.packed_call = enable_packed_attention(model) if packing else None
        self.vocab_size = vocab_size
        # T_c of the train cache (its manifest): cached values are re-tempered by T_c / τ
        self.cache_temperature = cache_temperature
        self.loss_cfg, self.max_grad_norm, self.device = loss_cfg, max_grad_norm, device
        self.divergence = Divergence.from_config(loss_cfg)
        self.scaler = torch.amp.GradScaler(device.type) if loss_scaling else None
        self.overflow_steps = self.consecutive_overflows = 0
        self.router_top_k = router_top_k(getattr(model, "config", None))

    def _loss(self, batch: Batch) -> LossSums:
        """Forward to the final hidden states + :func:`fused_linear_loss` of the valid positions;
        with ``aux_loss_coef > 0`` the model's auxiliary loss (a per-forward mean) is added as
        ``coef · aux · n_valid(micro-batch)``, so that after the division by the step's
        valid-token count it enters as a token-weighted mean. The router losses of
        ``loss.router`` (pipeline/router_losses.py, means over this micro-batch's valid
        positions) enter the same way, ``coef · term · n_valid``, and every router term is
        reported in ``LossSums.named`` as ``router_{name}`` (``term · n_valid``, detached).

        Raises:
            ValueError: ``aux_loss_coef > 0`` but the model returns no ``aux_loss``; a
                ``loss.router`` coefficient > 0 but the model returns no ``router_logits`` (or,
                for ``load_balance_coef``, its config names no experts-per-token).
        """
        c = self.loss_cfg
        rc = c.router
        extra = {"output_router_logits": True} if c.aux_loss_coef > 0 or rc.enabled else {}
        if batch.position_ids is not None:  # packed rows: positions restart per sample
            if self.packed_call is None:
                raise ValueError("a packed batch reached a Trainer built with packing=False")
            extra["position_ids"] = batch.position_ids
            if self.packed_call == "segments":  # one causal attention per sample (pipeline/packing.py)
                extra["attention_mask"] = torch.ones_like(batch.input_ids)
                extra["kd_segments"] = batch.segments
        out = self.model(input_ids=batch.input_ids, **extra)
        hidden = out.logits  # (R, L, H): the deferred output layer returns its input
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.rows)  # (N, H) valid positions
        # after the root forward FSDP2 keeps the root's parameters unsharded: .weight is the
        # all-gathered tensor, and its gradient joins the root's reduce-scatter
        if batch.aligned is not None:  # a cross-tokenizer batch (pipeline/student/cross_tokenizer_loss.py)
            sums = cross_tokenizer_loss(h, self.head.weight, self.head.bias, batch.targets(), alpha=c.alpha,
                                        temperature=c.temperature, mode=c.cross_tokenizer or "gold",
                                        vocab_size=self.vocab_size, chunk_size=c.chunk_size,
                                        cache_temperature=self.cache_temperature, softcap=self.head.softcap)
        else:
            sums = fused_linear_loss(h, self.head.weight, self.head.bias, batch.targets(), alpha=c.alpha,
                                     temperature=c.temperature, tail=c.tail, vocab_size=self.vocab_size,
                                     chunk_size=c.chunk_size, divergence=self.divergence,
                                     cache_temperature=self.cache_temperature, softcap=self.head.softcap)
        if c.aux_loss_coef > 0:
            aux = getattr(out, "aux_loss", None)
            if aux is None:
                raise ValueError("loss.aux_loss_coef > 0 but the student returns no aux_loss (not a MoE model?)")
            sums.loss_sum = sums.loss_sum + c.aux_loss_coef * aux * batch.n_valid
        if rc.enabled:
            sums.loss_sum = sums.loss_sum + self._router_loss(out, batch, sums.named)
        return sums

    def _router_loss(self, out, batch: Batch, named: dict[str, torch.Tensor]) -> torch.Tensor:
        """``Σ coef · term · n_valid`` of the ``loss.router`` terms of one forward's output (with
        grad); fills ``named`` with every computed term as ``router_{name}: term · n_valid``."""
        rc = self.loss_cfg.router
        logits = getattr(out, "router_logits", None)
        if not logits:
            key = next(f"loss.router.{n}_coef" for n in ROUTER_TERMS if getattr(rc, f"{n}_coef") > 0)
            raise ValueError(f"{key} > 0 but the student ({type(self.model).__name__}) returns no router_logits "
                             "with output_router_logits=True (not a mixture-of-experts model?)")
        if rc.load_balance_coef > 0 and self.router_top_k is None:
            raise ValueError("loss.router.load_balance_coef > 0 but the student's config names no experts per "
                             "token (num_experts_per_tok); set it in the config or use z_loss / auxiliary only")
        terms = router_losses(tuple(logits), batch.rows, self.router_top_k, batch.input_ids.numel())
        total = 0.0
        for name, value in terms.items():
            named[f"router_{name}"] = value.detach() * batch.n_valid
            coef = getattr(rc, f"{name}_coef")
            if coef > 0:
                total = total + coef * value * batch.n_valid
        return total

    def _rows(self, batches: list[Batch], per_sample: list[float], rows: dict[str, list]) -> None:
        """Append the loss-log rows of ``batches`` (host data + the transferred per-sample sums)."""
        c = self.loss_cfg
        at = 0
        for b in batches:
            S = len(b.sample_ids)
            ce, kl, dist, agree = (per_sample[at + j * S: at + (j + 1) * S] for j in range(4))
            at += 4 * S
            n_tok = b.n_tokens.tolist()
            mass = b.topk_mass_sum.tolist() if b.topk_mass_sum is not None else [0.0] * S
            ent = b.teacher_entropy_sum.tolist() if b.teacher_entropy_sum is not None else [0.0] * S
            xt = b.aligned_count is not None  # cross-tokenizer: aligned fraction, mean mapped teacher mass
            n_al = b.aligned_count.tolist() if xt else [0] * S
            m_mass = b.mapped_mass_sum.tolist() if xt else [0.0] * S
            for i, sid in enumerate(b.sample_ids):
                if sid is None:
                    continue
                for name, v in (("sample_id", sid), ("n_tokens", n_tok[i]), ("ce_sum", ce[i]), ("kl_sum", kl[i]),
                                ("distill_sum", dist[i]),
                                ("loss_sum", c.alpha * ce[i] + (1 - c.alpha) * c.temperature**2 * dist[i]),
                                ("top1_agree", int(agree[i])), ("topk_mass_sum", mass[i]),
                                ("teacher_entropy_sum", ent[i]),
                                ("aligned_frac", n_al[i] / max(n_tok[i], 1) if xt else None),
                                ("mapped_mass", m_mass[i] / max(n_al[i], 1) if xt else None)):
                    rows.setdefault(name, []).append(v)

    def _finish(self, batches: list[Batch], sums: list[LossSums], n_global: torch.Tensor,
                extra: list[torch.Tensor] = (), flag: bool = False
                ) -> tuple[list[float], list[float], dict, bool, dict[str, float]]:
        """All-reduce the totals (the named terms of ``LossSums.named`` too, and ``flag``, summed
        over ranks) and move totals, count, the scalars ``extra`` (already global) and the
        per-sample sums to the host in one transfer.

        Returns:
            ([Σ loss_sum, Σ CE, Σ KL, Σ D, N], extra as floats, rows, flag on any rank,
            {name: Σ over micro-batches and ranks} of the named terms).
        """
        f64 = torch.float64
        names = sorted(sums[0].named) if sums else []  # the same terms on every rank (set by the config)
        m = 5 + len(names)
        tot = torch.zeros(m, dtype=f64, device=self.device)
        tot[4] = float(flag)
        for s in sums:
            tot[:4] += torch.stack([s.loss_sum.detach().to(f64), s.ce_sum.sum().to(f64), s.kl_sum.sum().to(f64),
                                    s.distill_sum.sum().to(f64)])
            for j, name in enumerate(names):
                tot[5 + j] += s.named[name].to(f64)
        all_reduce_sum(tot)
        parts = [tot, n_global.to(f64).reshape(1), *(e.to(f64).reshape(1) for e in extra)]
        parts += [torch.cat([s.ce_sum.to(f64), s.kl_sum.to(f64), s.distill_sum.to(f64), s.top1_agree.to(f64)])
                  for s in sums]
        host = torch.cat(parts).tolist()  # the one host synchronisation
        rows: dict[str, list] = {}
        at = m + 1 + len(extra)
        self._rows(batches, host[at:], rows)
        return host[:4] + [host[m]], host[m + 1:at], rows, host[4] > 0, dict(zip(names, host[5:m]))

    def train_step(self, micro_batches: list[Batch], stop_requested: bool = False) -> StepStats:
        """One optimizer step over this rank's micro-batches (collective: all ranks call it).

        ``stop_requested`` (e.g. a SIGTERM seen by this rank) is agreed on over all ranks in the
        step's own all-reduce and returned as ``StepStats.stop``, so every rank stops after the
        same step without another synchronisation. A NaN/inf global loss or gradient norm skips
        the optimizer step (the weights and AdamW state stay those of the previous step) and is
        reported in ``StepStats.nonfinite``; the caller decides whether to stop.

        With loss scaling (fp16), each micro-batch back-propagates ``scale · loss_sum / N``; the
        gradients are unscaled (``GradScaler.unscale_``) before the gradient norm and clipping.
        Its inf/NaN check runs on every rank's gradient shards and is max-reduced over the
        FSDP2 mesh by DTensor's handler of ``_amp_foreach_non_finite_check_and_unscale_``, and
        the decision to step is taken from the all-reduced loss and gradient norm: the same on
        every rank. A finite loss with non-finite gradients is an **overflow**: the step is
        skipped, the scale multiplied by 0.5 (``StepStats.overflow``, counted in
        ``overflow_steps``; in a row: ``consecutive_overflows``), not a non-finite step. A non-finite loss does not depend on the
        scale: it is a non-finite step and the scale is kept. Either way the LR schedule
        advances: the LR follows the step index, as for every skipped step.
        """
        self.model.train()
        n_local = sum(b.n_valid for b in micro_batches)  # host-side counts: no device sync
        micro_batches = [b.to(self.device) for b in micro_batches]
        n_global = all_reduce_sum(torch.tensor([n_local], dtype=torch.int64, device=self.device))
        denom = n_global.clamp(min=1).to(torch.float32)  # stays on the device
        sums_all, scaler = [], self.scaler
        for i, batch in enumerate(micro_batches):
            set_gradient_sync(self.model, i == len(micro_batches) - 1)
            sums = self._loss(batch)
            loss = sums.loss_sum / denom
            (scaler.scale(loss) if scaler is not None else loss).backward()
            sums_all.append(sums)
        extra = []
        if scaler is not None:
            extra.append(scaler.scale(torch.ones((), device=self.device)))  # the scale used, without a sync
            scaler.unscale_(self.optimizer)  # true gradients before the norm and clipping
        # the global gradient norm, clipped when max_grad_norm is set (inf: measured only)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm or math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        # the one host sync, before the optimizer step: a non-finite step must not touch the weights
        tot, host_extra, rows, stop, named = self._finish(micro_batches, sums_all, n_global, [norm, *extra],
                                                          stop_requested)
        grad_norm, loss_scale = host_extra[0], (host_extra[1] if scaler is not None else None)
        loss_finite = math.isfinite(tot[0])  # the same on every rank (all-reduced)
        finite = loss_finite and math.isfinite(grad_norm)
        overflow = scaler is not None and loss_finite and not finite
        if finite:
            self.optimizer.step()
        if scaler is not None:
            if loss_finite:  # back off on the (all-reduced) overflow, else count towards growth
                scaler.update()
            else:  # the loss overflowed in the forward pass: no scale fixes it, keep this one
                scaler.update(new_scale=loss_scale)
            self.overflow_steps += overflow
            self.consecutive_overflows = self.consecutive_overflows + 1 if overflow else 0
        if self.scheduler is not None:
            with warnings.catch_warnings():  # a skipped step still advances the schedule: LR follows the step index
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        bad = []
        if not finite and not overflow:
            bad = [sid for sid, ce, kl in zip(rows.get("sample_id", []), rows.get("ce_sum", []), rows.get("kl_sum", []))
                   if not (math.isfinite(ce) and math.isfinite(kl))] or list(rows.get("sample_id", []))
        n = max(int(tot[4]), 1)
        return StepStats(*(x / n for x in tot[:4]), n_tokens=int(tot[4]), grad_norm=grad_norm, rows=rows, stop=stop,
                         nonfinite=not finite and not overflow, nonfinite_sample_ids=bad,
                         named={k: v / n for k, v in named.items()}, overflow=overflow, loss_scale=loss_scale,
                         overflow_steps=self.overflow_steps, consecutive_overflows=self.consecutive_overflows)

    @torch.no_grad()
    def evaluate(self, batches) -> StepStats:
        """Per-token loss/CE/KL over all ranks' batches (no_grad, not inference_mode:
        PLATFORM.md trap 2). Collective: every rank must pass the same number of batches."""
        self.model.eval()
        kept, sums_all, n_local = [], [], 0
        for batch in batches:
            n_local += batch.n_valid
            kept.append(batch)  # the host copy: its rows are written after the one transfer
            sums_all.append(self._loss(batch.to(self.device)))
        n_global = all_reduce_sum(torch.tensor([n_local], dtype=torch.int64, device=self.device))
        tot, _, rows, _, named = self._finish(kept, sums_all, n_global)
        n = max(int(tot[4]), 1)
        return StepStats(*(x / n for x in tot[:4]), n_tokens=int(tot[4]), rows=rows,
                         named={k: v / n for k, v in named.items()})

    def state_dict(self) -> dict:
        """The trainer's own resumable state (saved in the checkpoint's trainer state): the
        GradScaler's scale and growth tracker (None without loss scaling), ``overflow_steps`` and
        ``consecutive_overflows``."""
        return {"grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "overflow_steps": self.overflow_steps, "consecutive_overflows": self.consecutive_overflows}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (missing keys, e.g. a checkpoint of a run without loss
        scaling, leave the fresh values)."""
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.overflow_steps = int(state.get("overflow_steps", 0))
        self.consecutive_overflows = int(state.get("consecutive_overflows", 0))
