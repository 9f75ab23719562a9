"""One optimizer step over all micro-batches of an accumulation window, and evaluation.

Sum, count, normalise once (DESIGN.md, Loss): the valid positions of the whole step are
counted over all micro-batches and ranks *before* the backward passes; every micro-batch
back-propagates ``loss_sum / N``; FSDP's gradient averaging is off (``shard_model``), so the
gradient is ``∇(Σ loss_sum) / N`` whatever the micro-batch size, accumulation and world size.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.config import LossConfig, OptimConfig
from pipeline.distributed import all_reduce_sum, set_gradient_sync
from pipeline.loader import Batch
from pipeline.losses import LossSums, distill_loss


@dataclass
class StepStats:
    """Global (all-reduced) totals of a step or an evaluation, plus this rank's sample rows.

    ``loss``, ``ce``, ``kl`` are per valid token: ``Σ loss_sum / N`` etc. ``rows`` holds one
    dict of lists (``sample_id, n_tokens, ce_sum, kl_sum, loss_sum, top1_agree,
    topk_mass_sum, teacher_entropy_sum``) for this rank's samples.
    """

    loss: float
    ce: float
    kl: float
    n_tokens: int
    grad_norm: float | None = None
    rows: dict[str, list] = field(default_factory=dict)


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
    return torch.optim.AdamW(list(groups.values()), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


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


def early_stopping_update(best: float, bad_evals: int, loss: float, min_delta: float,
                          patience: int | None) -> tuple[float, int, bool, bool]:
    """One evaluation's effect on early stopping.

    An eval improves when ``loss < best - min_delta``; ``patience`` consecutive evals without
    improvement stop training (None: never stop).

    Returns:
        (new best, new count of evals without improvement, improved, stop)
    """
    improved = loss < best - min_delta
    best, bad_evals = (loss, 0) if improved else (best, bad_evals + 1)
    return best, bad_evals, improved, patience is not None and bad_evals >= patience


class Trainer:
    """Runs optimizer steps and evaluations of a (FSDP2-wrapped) causal LM.

    Args:
        model: the student, already wrapped by ``pipeline.distributed.shard_model``.
        loss_cfg: α, τ, tail mode, chunk size.
        max_grad_norm: clip threshold on the global L2 norm (None: no clipping).
        device: where batches go.
        vocab_size: the data's vocabulary V; a student whose output layer is padded beyond it
            has its logits sliced to the first V (padding rows get no probability mass).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, loss_cfg: LossConfig,
                 max_grad_norm: float | None, device: torch.device, vocab_size: int | None = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.vocab_size = vocab_size
        self.loss_cfg, self.max_grad_norm, self.device = loss_cfg, max_grad_norm, device

    def _loss(self, batch: Batch) -> LossSums:
        """Forward + :func:`distill_loss`; with ``aux_loss_coef > 0`` the model's auxiliary loss
        (a per-forward mean) is added as ``coef · aux · n_valid(micro-batch)``, so that after the
        division by the step's valid-token count it enters as a token-weighted mean.

        Raises:
            ValueError: ``aux_loss_coef > 0`` but the model returns no ``aux_loss``.
        """
        c = self.loss_cfg
        extra = {"output_router_logits": True} if c.aux_loss_coef > 0 else {}
        out = self.model(input_ids=batch.input_ids, **extra)
        logits = out.logits if self.vocab_size is None else out.logits[..., : self.vocab_size]
        sums = distill_loss(logits, batch.input_ids, batch.valid, alpha=c.alpha, temperature=c.temperature,
                            tail=c.tail, topk_ids=batch.topk_ids, topk_logprobs=batch.topk_logprobs,
                            tail_logprob=batch.tail_logprob, chunk_size=c.chunk_size)
        if c.aux_loss_coef > 0:
            aux = getattr(out, "aux_loss", None)
            if aux is None:
                raise ValueError("loss.aux_loss_coef > 0 but the student returns no aux_loss (not a MoE model?)")
            sums.loss_sum = sums.loss_sum + c.aux_loss_coef * aux * batch.n_valid
        return sums

    def _rows(self, batch: Batch, sums: LossSums, rows: dict[str, list]) -> None:
        c = self.loss_cfg
        loss = c.alpha * sums.ce_sum + (1 - c.alpha) * c.temperature**2 * sums.kl_sum
        zeros = torch.zeros_like(sums.ce_sum)
        mass = entropy = zeros
        if batch.tail_logprob is not None:  # teacher statistics over the valid positions, per sample
            mass = (-torch.expm1(batch.tail_logprob) * batch.valid).sum(-1)
            lp = batch.topk_logprobs  # (B, T-1, k)
            plogp = torch.where(torch.isneginf(lp), 0.0, lp.exp() * lp)  # -inf = padding slot (sampled caches)
            entropy = (-plogp.sum(-1) * batch.valid).sum(-1)  # entropy restricted to the stored ids
        keep = [i for i, s in enumerate(batch.sample_ids) if s is not None]
        cols = {"sample_id": batch.sample_ids, "n_tokens": sums.n_tokens, "ce_sum": sums.ce_sum,
                "kl_sum": sums.kl_sum, "loss_sum": loss, "top1_agree": sums.top1_agree,
                "topk_mass_sum": mass, "teacher_entropy_sum": entropy}
        for name, col in cols.items():
            vals = col if isinstance(col, list) else col.tolist()
            rows.setdefault(name, []).extend(vals[i] for i in keep)

    def _totals(self, sums: list[LossSums]) -> torch.Tensor:
        """(4,) float64 this-rank [Σ loss_sum, Σ CE, Σ KL, N]."""
        t = torch.zeros(4, dtype=torch.float64, device=self.device)
        for s in sums:
            t += torch.stack([s.loss_sum.detach().double(), s.ce_sum.sum().double(), s.kl_sum.sum().double(),
                              s.n_tokens.sum().double()])
        return t

    def train_step(self, micro_batches: list[Batch]) -> StepStats:
        """One optimizer step over this rank's micro-batches (collective: all ranks call it)."""
        self.model.train()
        micro_batches = [b.to(self.device) for b in micro_batches]
        n_global = all_reduce_sum(torch.tensor([sum(b.n_valid for b in micro_batches)], device=self.device))
        denom = max(int(n_global.item()), 1)
        rows: dict[str, list] = {}
        sums_all = []
        for i, batch in enumerate(micro_batches):
            set_gradient_sync(self.model, i == len(micro_batches) - 1)
            sums = self._loss(batch)
            (sums.loss_sum / denom).backward()
            sums_all.append(sums)
            self._rows(batch, sums, rows)
        grad_norm = None
        if self.max_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        tot = all_reduce_sum(self._totals(sums_all))
        return StepStats(*(float(x) / denom for x in tot[:3]), n_tokens=int(tot[3]), grad_norm=grad_norm, rows=rows)

    @torch.no_grad()
    def evaluate(self, batches) -> StepStats:
        """Per-token loss/CE/KL over all ranks' batches (no_grad, not inference_mode:
        PLATFORM.md trap 2). Collective: every rank must pass the same number of batches."""
        self.model.eval()
        rows: dict[str, list] = {}
        tot = torch.zeros(4, dtype=torch.float64, device=self.device)
        for batch in batches:
            batch = batch.to(self.device)
            sums = self._loss(batch)
            tot += self._totals([sums])
            self._rows(batch, sums, rows)
        all_reduce_sum(tot)
        n = max(int(tot[3]), 1)
        return StepStats(*(float(x) / n for x in tot[:3]), n_tokens=int(tot[3]), rows=rows)
