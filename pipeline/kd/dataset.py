"""The teacher cache as a ``torch.utils.data`` dataset, the collator that turns its records into
the tensors :class:`~pipeline.kd.loss.KDLoss` takes, and the sampler that visits them in
train-student's order.

The batch is a ``dict`` of tensors (what a ``DataLoader`` moves and the Hugging Face
``Trainer`` places on the device), built by :func:`pipeline.data.batch.collate`, the collation
train-student itself uses, so both see the same valid positions in the same order.
"""
from __future__ import annotations

import os
from typing import Iterator, Mapping

import numpy as np
import torch

from pipeline.cache import CacheReader, CacheRecord, Manifest, open_cache
from pipeline.data.batch import Batch, LossTargets, collate
from pipeline.student.sampler import StepSampler

IGNORE_INDEX = -100
"""``labels`` value of a position that is not a target (the Hugging Face convention)."""


class CacheDataset(torch.utils.data.Dataset):
    """Map-style dataset over a complete teacher cache (a local directory or a bucket URL such
    as ``s3://bucket/cache``): ``len`` samples, ``dataset[i]`` the ``i``-th in storage order.

    Each item is a :class:`~pipeline.cache.CacheRecord`: ``input_ids`` (T,) int32,
    ``loss_mask`` (T,) bool (position ``t`` is a target iff ``loss_mask[t+1]``), ``topk_ids``
    (T-1, k) int32, ``topk_logprobs`` (T-1, k) float32 teacher log-probabilities at the cache
    temperature (``-inf`` = padding slot), ``tail_logprob`` (T-1,) float32, ``sample_id``.

    Reading is random access through the cache reader's LRU of decoded blocks. The dataset
    pickles as its path and options, so ``DataLoader`` workers each open their own reader.

    Args:
        path: the cache directory (``cache.dir`` of precompute-teacher) or its URL.
        max_cached_bytes: bound of the reader's LRU of decoded blocks (bytes).
        verify: check each shard's checksum on first read and every decoded record.
    Raises:
        FileNotFoundError: no cache at ``path``. ValueError: an incomplete or invalid cache
            (:func:`pipeline.cache.open_cache`; path named).
    """

    def __init__(self, path: str | os.PathLike, max_cached_bytes: int = 1 << 30, verify: bool = True):
        self.path, self.max_cached_bytes, self.verify = str(path), max_cached_bytes, verify
        self._reader: CacheReader | None = open_cache(self.path, verify=verify, max_cached_bytes=max_cached_bytes)
        self.manifest: Manifest = self._reader.manifest
        self._len = len(self._reader)

    @property
    def reader(self) -> CacheReader:
        """The cache reader (opened again after unpickling, e.g. in a ``DataLoader`` worker)."""
        if self._reader is None:
            self._reader = open_cache(self.path, verify=self.verify, max_cached_bytes=self.max_cached_bytes)
        return self._reader

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> CacheRecord:
        if not -self._len <= i < self._len:
            raise IndexError(f"cache {self.path}: index {i} out of range for {self._len} samples")
        return self.reader[int(i) % self._len]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}


class KDCollator:
    """Collate :class:`CacheDataset` items into the batch ``dict`` of :class:`~pipeline.kd.loss.KDLoss`.

    Rows are right-padded with token 0 (causal attention keeps the padding out of every valid
    position). Keys, with R rows of L tokens, S samples, N valid positions and k cached ids:

    * ``input_ids`` (R, L) int64: the model's input.
    * ``labels`` (R, L) int64: the next token of every valid position at the position after it,
      ``-100`` elsewhere (the Hugging Face convention: a model's own shifted cross-entropy on
      these labels counts exactly the N positions of the KD loss).
    * ``rows`` (N,) int64: flat index ``r * L + t`` of each valid position, sample-major.
    * ``sample_index`` (N,) int64: its sample, in ``[0, S)``; ``n_tokens`` (S,) int64 valid
      positions per sample.
    * ``topk_ids`` (N, k) int64, ``topk_logprobs`` (N, k) float32, ``tail_logprob`` (N,) float32:
      the teacher targets of the valid positions (cache temperature).
    * ``sample_ids``: the S sample IDs (a list of str).

    Args:
        pack_length: pack the samples into rows of this many tokens (with ``position_ids``
            (R, L) restarting at 0 per sample); the model's attention must then keep each sample
            to itself. None: one row per sample.
    """

    def __init__(self, pack_length: int | None = None):
        self.pack_length = pack_length

    def __call__(self, records: list[CacheRecord]) -> dict:
        return inputs_of(collate(records, pack_length=self.pack_length))


def inputs_of(batch: Batch) -> dict:
    """The :class:`KDCollator` ``dict`` of a collated :class:`~pipeline.data.batch.Batch`."""
    labels = torch.full_like(batch.input_ids, IGNORE_INDEX)
    labels.view(-1)[batch.rows + 1] = batch.labels  # the target of position t sits at t + 1
    out = {"input_ids": batch.input_ids, "labels": labels, "rows": batch.rows, "sample_index": batch.sample_index,
           "n_tokens": batch.n_tokens, "topk_ids": batch.topk_ids, "topk_logprobs": batch.topk_logprobs,
           "tail_logprob": batch.tail_logprob, "sample_ids": batch.sample_ids}
    if batch.position_ids is not None:
        out["position_ids"] = batch.position_ids
    return {key: value for key, value in out.items() if value is not None}


def targets_of(inputs: Mapping | Batch) -> tuple[torch.Tensor, LossTargets]:
    """``(rows, targets)`` of a batch: the (N,) flat indices of the valid positions in the
    (R, L) rows, and their :class:`~pipeline.data.batch.LossTargets`.

    Args:
        inputs: a :class:`KDCollator` ``dict`` (on any device) or a collated ``Batch``.
    Raises:
        KeyError: a ``dict`` without ``rows``, ``labels`` or ``sample_index`` (not a KDCollator batch).
    """
    if isinstance(inputs, Batch):
        return inputs.rows, inputs.targets()
    rows = inputs["rows"]
    labels = inputs["labels"].reshape(-1).index_select(0, rows + 1)  # (N,) next-token ids
    n_samples = len(inputs["n_tokens"]) if "n_tokens" in inputs else int(inputs["sample_index"].max()) + 1
    return rows, LossTargets(labels, inputs["sample_index"], n_samples, inputs.get("topk_ids"),
                             inputs.get("topk_logprobs"), inputs.get("tail_logprob"))


class StepOrderSampler(torch.utils.data.Sampler):
    """Sample indices in train-student's ``data.shuffle: global`` order: epoch ``e`` visits
    ``numpy.random.default_rng([seed, e]).permutation(n)``
    (:meth:`pipeline.student.sampler.StepSampler.epoch_order`), cut to whole global batches as
    train-student drops an epoch's tail. With a ``DataLoader`` of ``micro_batch_size`` and
    ``grad_accum_steps`` micro-batches per optimizer step on ``world_size`` data-parallel
    ranks (each rank taking every ``world_size``-th micro-batch, as Accelerate shards them),
    optimizer step ``s`` trains on the same samples as train-student's step ``s``.

    Args:
        n: dataset length. micro_batch_size, grad_accum_steps, world_size: the global batch
            ``micro_batch_size × grad_accum_steps × world_size``. seed: train-student's ``seed``.
    Raises:
        ValueError: fewer than one global batch of samples.
    """

    def __init__(self, n: int, micro_batch_size: int, grad_accum_steps: int = 1, world_size: int = 1, seed: int = 0):
        self.steps = StepSampler(np.arange(n), micro_batch_size, grad_accum_steps, 0, world_size, seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Visit epoch ``epoch``'s order next (called by the Trainer / Accelerate each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps.steps_per_epoch * self.steps.global_batch

    def __iter__(self) -> Iterator[int]:
        return iter(self.steps.epoch_order(self.epoch)[: len(self)].tolist())
