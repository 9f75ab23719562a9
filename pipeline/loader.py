"""Batches for the student: deterministic per-rank sampling and collation of cache records.

One optimizer step consumes ``micro_batch_size × grad_accum_steps × world_size`` samples:
a contiguous slice of a seeded per-epoch permutation, split rank-major, so the step's
global sample set is the same whatever the micro-batch size, accumulation and world size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


@dataclass
class Batch:
    """A padded micro-batch (right padding; causal attention makes the padding harmless).

    Attributes:
        sample_ids: B IDs; ``None`` marks a padding sample (no valid position, not logged).
        input_ids: (B, T) int64.
        valid: (B, T-1) bool valid positions.
        topk_ids: (B, T-1, k) int64 or None; topk_logprobs: (B, T-1, k) float32 or None;
        tail_logprob: (B, T-1) float32 or None (teacher targets, absent for CE-only data).
    """

    sample_ids: list[str | None]
    input_ids: torch.Tensor
    valid: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tail_logprob: torch.Tensor | None = None

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(self.sample_ids, move(self.input_ids), move(self.valid), move(self.topk_ids),
                     move(self.topk_logprobs), move(self.tail_logprob))

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())


def collate(records: list, pad_only: bool = False) -> Batch:
    """Pad records (cache records or plain samples) into a :class:`Batch`.

    Args:
        records: objects with ``sample_id``, ``input_ids`` (T,), ``loss_mask`` (T,) and, for
            cache records, ``topk_ids`` (T-1, k), ``topk_logprobs``, ``tail_logprob``.
        pad_only: mark every sample as padding (no valid position); used so that all ranks
            make the same number of forward calls (PLATFORM.md trap 4).
    """
    B = len(records)
    T = max(len(r.input_ids) for r in records)
    ids = np.zeros((B, T), dtype=np.int64)
    valid = np.zeros((B, T - 1), dtype=bool)
    has_targets = hasattr(records[0], "topk_ids")
    if has_targets:
        k = records[0].topk_ids.shape[1]
        tk_ids = np.zeros((B, T - 1, k), dtype=np.int64)
        tk_lp = np.zeros((B, T - 1, k), dtype=np.float32)
        tail = np.full((B, T - 1), -np.inf, dtype=np.float32)
    for i, r in enumerate(records):
        n = len(r.input_ids)
        ids[i, :n] = r.input_ids
        if not pad_only:
            valid[i, : n - 1] = r.loss_mask[1:]
        if has_targets:
            tk_ids[i, : n - 1] = r.topk_ids
            tk_lp[i, : n - 1] = r.topk_logprobs
            tail[i, : n - 1] = r.tail_logprob
    sids = [None if pad_only else r.sample_id for r in records]
    if not has_targets:
        return Batch(sids, torch.from_numpy(ids), torch.from_numpy(valid))
    return Batch(sids, torch.from_numpy(ids), torch.from_numpy(valid), torch.from_numpy(tk_ids),
                 torch.from_numpy(tk_lp), torch.from_numpy(tail))


@dataclass
class StepSampler:
    """Yields, per optimizer step, this rank's micro-batches of sample indices.

    Epoch ``e`` uses ``np.random.default_rng([seed, e]).permutation(indices)`` (or, with
    ``weights``, ``len(indices)`` draws with replacement ∝ weights); the tail of an
    epoch that does not fill a global batch is dropped (every rank makes the same calls).

    Attributes:
        indices: (N,) dataset indices to train on.
        epoch, position: where the next step starts (global samples consumed in the epoch).
    """

    indices: np.ndarray
    micro_batch_size: int
    grad_accum_steps: int
    rank: int
    world_size: int
    seed: int
    epoch: int = 0
    position: int = 0
    weights: np.ndarray | None = None
    """(N,) sampling weights of ``indices``: epochs are drawn with replacement ∝ weights."""

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.indices) // self.global_batch

    def __post_init__(self) -> None:
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.indices)} training samples are fewer than one global batch "
                             f"(micro_batch_size × grad_accum_steps × world_size = {self.global_batch})")

    def next_step(self) -> list[np.ndarray]:
        """This rank's ``grad_accum_steps`` micro-batches for the next optimizer step."""
        if self.position + self.global_batch > len(self.indices):
            self.epoch, self.position = self.epoch + 1, 0
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is None:
            perm = rng.permutation(self.indices)
        else:
            perm = rng.choice(self.indices, size=len(self.indices), replace=True, p=self.weights / self.weights.sum())
        step = perm[self.position: self.position + self.global_batch]
        self.position += self.global_batch
        per_rank = self.micro_batch_size * self.grad_accum_steps
        mine = step[self.rank * per_rank: (self.rank + 1) * per_rank]
        return [mine[i * self.micro_batch_size: (i + 1) * self.micro_batch_size] for i in range(self.grad_accum_steps)]


def eval_batches(source, n: int, batch_size: int, rank: int, world_size: int) -> Iterator[Batch]:
    """This rank's strided share of the first ``n`` samples of ``source``, batched; ranks with
    fewer batches get padding batches so all ranks make the same number of forward calls."""
    mine = list(range(rank, n, world_size))
    n_batches = -(-((n + world_size - 1) // world_size) // batch_size)
    for b in range(n_batches):
        chunk = mine[b * batch_size: (b + 1) * batch_size]
        if chunk:
            yield collate([source[i] for i in chunk])
        else:
            yield collate([source[0]], pad_only=True)
