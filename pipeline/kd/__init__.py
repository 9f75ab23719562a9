"""Offline KD from a teacher cache inside your own training loop: the public API.

* :class:`CacheDataset`: a teacher cache (local directory or bucket URL) as a map-style
  ``torch.utils.data.Dataset`` of records (input ids, loss mask, sparse teacher targets).
* :class:`KDCollator`: records → the padded batch ``dict`` the loss takes.
* :class:`KDLoss`: ``α·CE + (1−α)·τ²·D`` fused with the output layer, sum-reduced and divided
  by the step's valid-token count ``num_items_in_batch``: train-student's loss, every
  divergence and tail mode, the cache temperature read from the cache's manifest.
* :class:`KDTrainer`: a ``transformers.Trainer`` that trains from the cache with that loss.
* :class:`StepOrderSampler`: train-student's sample order for any ``DataLoader``.
* :func:`defer_output_projection` / :func:`restore_output_projection`: make the model return
  its final hidden states (the loss applies the output layer), and undo it.

Names exported here are stable across minor versions; everything else is internal.
"""
from __future__ import annotations

from pipeline.kd.dataset import CacheDataset, KDCollator, StepOrderSampler
from pipeline.kd.loss import KDLoss, defer_output_projection, restore_output_projection

__all__ = ["CacheDataset", "KDCollator", "KDLoss", "KDTrainer", "StepOrderSampler", "defer_output_projection",
           "restore_output_projection"]


def __getattr__(name: str):
    if name == "KDTrainer":  # imported on first use: transformers.Trainer pulls in accelerate
        from pipeline.kd.hf import KDTrainer

        return KDTrainer
    raise AttributeError(f"module 'pipeline.kd' has no attribute {name!r}")
