"""The fused KD loss as an ``nn.Module``: train-student's loss for any training loop.

``loss = (α Σ CE + (1−α) τ² Σ D) / num_items_in_batch`` over the valid positions of a batch,
both terms sum-reduced (DESIGN.md, Loss; the formulas, tail modes and divergences in
:mod:`pipeline.student.losses` and :mod:`pipeline.student.divergences`). The output layer is
applied inside the loss chunk by chunk (:func:`pipeline.student.losses.fused_linear_loss`), so
the model must return its final hidden states: :func:`defer_output_projection` makes it do so.
"""
from __future__ import annotations

import os
import warnings
from typing import Mapping

import torch
from torch import nn

from pipeline.cache import Manifest, read_manifest
from pipeline.data.batch import Batch
from pipeline.kd.dataset import targets_of
from pipeline.models import OutputProjection, defer_output_projection
from pipeline.student.divergences import Divergence
from pipeline.student.losses import TAIL_MODES, LossSums, check_tail_mode, check_temperatures, fused_linear_loss

__all__ = ["KDLoss", "defer_output_projection", "restore_output_projection"]


def _manifest(cache) -> Manifest:
    """The manifest of a :class:`CacheDataset`, a cache reader, a ``Manifest`` or a cache path/URL."""
    if isinstance(cache, Manifest):
        return cache
    if hasattr(cache, "manifest"):
        return cache.manifest
    if isinstance(cache, (str, os.PathLike)):
        return read_manifest(cache)
    raise TypeError(f"cache must be a CacheDataset, a cache reader, a Manifest or a cache path, not {type(cache).__name__}")


class KDLoss(nn.Module):
    """``α·CE + (1−α)·τ²·D`` of the valid positions, fused with the output layer.

    Args:
        cache: the train cache (:class:`~pipeline.kd.CacheDataset`, its path or URL, or its
            ``Manifest``): gives the cache temperature ``T_c`` the cached values were written
            at, the default ``tail``, and the data's vocabulary V; the pair (tail, τ) is checked
            against it as train-student checks it. None: ``cache_temperature`` and
            ``vocab_size`` as given, the tail mode taken as it is (default ``bucket``).
        alpha: weight of the cross-entropy, in [0, 1] (``loss.alpha``).
        temperature: τ > 0 of the student's softmax in ``D`` (``loss.temperature``); CE is at 1.
        tail: ``bucket``, ``renormalize`` or ``sampled`` (``loss.tail``); None: ``bucket`` for a
            ``topk`` cache, ``sampled`` for a sampled one, as train-student.
        divergence: ``D``: ``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_forward_kl``,
            ``skew_reverse_kl``, ``tvd`` or ``akl``; ``beta``, ``skew``, ``akl_mu`` their parameters.
        chunk_size: positions per chunk of the fused loss (0: from a 128 MiB budget).
        cache_temperature: ``T_c`` when no ``cache`` is given (default 1).
        vocab_size: V when no ``cache`` is given (default: the output layer's rows).
    Raises:
        ValueError: a parameter out of range; a (tail, cache) pair train-student refuses
            (``bucket`` on a sampled cache, ``sampled`` on a top-k one, another divergence than
            forward KL on a sampled cache); ``bucket`` at ``τ ≠ T_c`` on a cache of fewer than V
            ids per position (:func:`pipeline.student.losses.check_temperatures`).
    """

    def __init__(self, cache=None, *, alpha: float = 0.5, temperature: float = 1.0, tail: str | None = None,
                 divergence: str = "forward_kl", beta: float = 0.5, skew: float = 0.1, akl_mu: float = 0.5,
                 chunk_size: int = 0, cache_temperature: float | None = None, vocab_size: int | None = None):
        super().__init__()
        if not 0.0 <= alpha <= 1.0 or temperature <= 0 or chunk_size < 0:
            raise ValueError(f"KDLoss: need 0 <= alpha <= 1, temperature > 0, chunk_size >= 0; got alpha={alpha}, "
                             f"temperature={temperature}, chunk_size={chunk_size}")
        self.divergence = Divergence(divergence, beta=beta, skew=skew, akl_mu=akl_mu)
        self.alpha, self.temperature, self.chunk_size = float(alpha), float(temperature), chunk_size
        self.cache_temperature, self.vocab_size = cache_temperature, vocab_size
        target_type = "topk"
        if cache is not None:
            m = _manifest(cache)
            self.cache_temperature = m.temperature if cache_temperature is None else cache_temperature
            self.vocab_size = m.vocab_size if vocab_size is None else vocab_size
            target_type = m.target_type
        self.cache_temperature = 1.0 if self.cache_temperature is None else float(self.cache_temperature)
        self.tail = tail or ("bucket" if target_type == "topk" else "sampled")
        if self.tail not in TAIL_MODES:
            raise ValueError(f"KDLoss: tail must be one of {TAIL_MODES}, got {self.tail!r}")
        if cache is not None and alpha < 1.0:  # the checks of train-student's resolve_tail
            if target_type != "topk" and divergence != "forward_kl":
                raise ValueError(f"KDLoss: divergence={divergence} on a {target_type} cache: sampled targets take "
                                 "forward_kl only")
            for w in check_tail_mode(self.tail, target_type, self.temperature, self.cache_temperature):
                warnings.warn(w, stacklevel=2)
            check_temperatures(self.tail, self.temperature, self.cache_temperature, m.k, m.vocab_size)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, temperature={self.temperature}, tail={self.tail}, "
                f"divergence={self.divergence.name}, cache_temperature={self.cache_temperature}")

    def sums(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             batch: Mapping | Batch) -> LossSums:
        """The per-batch sums: ``loss_sum`` (scalar, with grad) and the per-sample ``ce_sum``,
        ``kl_sum``, ``distill_sum`` (nats) and ``top1_agree`` of
        :class:`~pipeline.student.losses.LossSums`. Arguments as :meth:`forward`."""
        rows, targets = targets_of(batch)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # (N, H) the valid positions
        return fused_linear_loss(h, weight, bias, targets, alpha=self.alpha, temperature=self.temperature,
                                 tail=self.tail, vocab_size=self.vocab_size, chunk_size=self.chunk_size,
                                 divergence=self.divergence, cache_temperature=self.cache_temperature)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, batch: Mapping | Batch,
                num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
        """The loss of one (micro-)batch.

        Args:
            hidden: (R, L, H) final hidden states of the batch's ``input_ids`` (float32, or
                bf16/fp16 under autocast; the logits and softmax are float32).
            weight: (V_out, H) the output layer's weight (``V_out >= V``; extra rows unused).
            bias: (V_out,) or None.
            batch: the :class:`~pipeline.kd.KDCollator` ``dict`` (or a collated ``Batch``).
            num_items_in_batch: the number of valid positions of the whole optimizer step, all
                micro-batches and all data-parallel ranks (the Hugging Face Trainer's
                argument). None: the sum itself is returned.
        Returns:
            Scalar float32: ``Σ loss / num_items_in_batch``. Back-propagating it on every
            micro-batch of a step gives the gradient of one big batch; under data parallelism
            that averages gradients over ``W`` ranks (DDP, FSDP), multiply it by ``W``.
        Raises:
            ValueError: ``alpha < 1`` and the batch has no teacher targets; the output layer has
                fewer rows than the cache's vocabulary.
        """
        loss = self.sums(hidden, weight, bias, batch).loss_sum
        return loss if num_items_in_batch is None else loss / num_items_in_batch


def restore_output_projection(model: nn.Module) -> nn.Linear | None:
    """Undo :func:`defer_output_projection`: put an ``nn.Linear`` holding the same weight (and
    bias) Parameters back as the model's output layer, so ``model(...).logits`` are logits again
    (generation, evaluation with other tools). Tied weights stay tied.

    Returns:
        The new output layer, or None when the model's output layer was not deferred.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, OutputProjection):
        return None
    linear = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    linear.weight = head.weight
    if head.bias is not None:
        linear.bias = head.bias
    model.set_output_embeddings(linear)
    return linear
