"""Batches for the student: deterministic per-rank sampling of cache records and prefetching.

One optimizer step consumes ``micro_batch_size × grad_accum_steps × world_size`` samples:
a contiguous slice of a seeded per-epoch permutation, split rank-major, so the step's
global sample set is the same whatever the micro-batch size, accumulation and world size.
"""
from __future__ import annotations

import copy
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from pipeline.data.batch import Batch, collate


@dataclass
class StepSampler:
    """Yields, per optimizer step, this rank's micro-batches of sample indices.

    Epoch ``e`` uses ``np.random.default_rng([seed, e]).permutation(indices)`` (or, with
    ``weights``, ``len(indices)`` draws with replacement ∝ weights; or, with ``groups``, a
    block shuffle); the tail of an epoch that does not fill a global batch is dropped (every
    rank makes the same calls).

    Block shuffle (``groups``, e.g. the cache block of every index): the groups are visited
    in a random order and the samples of each window of ``window`` consecutive groups are
    permuted together, so a reader whose LRU holds ``window`` blocks decodes every block once
    per epoch however large the cache (the shuffle-buffer scheme of WebDataset / MosaicML
    Streaming). Weights, when given, take precedence.

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
    groups: np.ndarray | None = None
    """(N,) int64 group (cache block) of each entry of ``indices``: block shuffle."""
    window: int = 16
    """Groups shuffled together by the block shuffle."""
    _order: dict = field(default_factory=dict, repr=False, compare=False)

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

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(N,) sample indices of ``epoch`` in visiting order (memoised for the latest epoch)."""
        if epoch not in self._order:
            rng = np.random.default_rng([self.seed, epoch])
            if self.weights is None and self.groups is not None:
                order = self._block_order(rng)
            elif self.weights is None:
                order = rng.permutation(self.indices)
            else:
                order = rng.choice(self.indices, size=len(self.indices), replace=True, p=self.weights / self.weights.sum())
            self._order.clear()
            self._order[epoch] = order
        return self._order[epoch]

    def _block_order(self, rng: np.random.Generator) -> np.ndarray:
        uniq, inverse = np.unique(self.groups, return_inverse=True)
        visit = rng.permutation(len(uniq))  # visit[j]: the j-th group visited
        rank_of = np.empty(len(uniq), dtype=np.int64)
        rank_of[visit] = np.arange(len(uniq))
        window_of = rank_of[inverse] // max(self.window, 1)  # (N,) window of each entry
        # sort by (window, random key): windows in visiting order, samples shuffled inside
        return self.indices[np.lexsort((rng.random(len(self.indices)), window_of))]

    def next_step(self) -> list[np.ndarray]:
        """This rank's ``grad_accum_steps`` micro-batches for the next optimizer step."""
        if self.position + self.global_batch > len(self.indices):
            self.epoch, self.position = self.epoch + 1, 0
        step = self.epoch_order(self.epoch)[self.position: self.position + self.global_batch]
        self.position += self.global_batch
        per_rank = self.micro_batch_size * self.grad_accum_steps
        mine = step[self.rank * per_rank: (self.rank + 1) * per_rank]
        return [mine[i * self.micro_batch_size: (i + 1) * self.micro_batch_size] for i in range(self.grad_accum_steps)]


EVAL_SUBSET_STREAM = 0x6576616C
"""Second word of the eval subset's seed, ``[seed, EVAL_SUBSET_STREAM]`` ("eval" in ASCII):
a stream apart from the epochs' ``[seed, epoch]``."""


def eval_subset(n_samples: int, max_samples: int | None, seed: int) -> np.ndarray:
    """The indices of the samples evaluated (``data.eval_max_samples``): all of them in order,
    or ``max_samples`` drawn uniformly without replacement by
    ``numpy.random.default_rng([seed, EVAL_SUBSET_STREAM])``, sorted (cache locality). Not the
    first N: stage 1 sorts each window by length, so the first samples are the longest. The
    draw depends on ``seed`` and ``n_samples`` only: the same at any rank count, on every
    rerun and after a resume.

    Returns:
        (min(n_samples, max_samples),) int64 sorted unique indices in ``[0, n_samples)``.
    """
    if max_samples is None or max_samples >= n_samples:
        return np.arange(n_samples, dtype=np.int64)
    rng = np.random.default_rng([seed, EVAL_SUBSET_STREAM])
    return np.sort(rng.choice(n_samples, size=max_samples, replace=False)).astype(np.int64)


def eval_batches(source, indices: np.ndarray, batch_size: int, rank: int, world_size: int,
                 pack_length: int | None = None) -> Iterator[Batch]:
    """This rank's strided share of the samples ``indices`` of ``source`` (:func:`eval_subset`),
    batched (packed into rows of ``pack_length`` tokens when set); ranks with fewer batches get
    padding batches so all ranks make the same number of forward calls."""
    n = len(indices)
    mine = [int(i) for i in indices[rank::world_size]]
    n_batches = -(-((n + world_size - 1) // world_size) // batch_size)
    for b in range(n_batches):
        chunk = mine[b * batch_size: (b + 1) * batch_size]
        if chunk:
            yield collate([source[i] for i in chunk], pack_length=pack_length)
        else:
            yield collate([source[0]], pad_only=True)


class StepPrefetcher:
    """Reads and collates the micro-batches of the next ``depth`` optimizer steps in
    ``num_workers`` background threads, so the trainer does not wait on the cache.

    The wrapped :class:`StepSampler` advances only when a step is consumed, so its
    ``epoch``/``position`` (saved in checkpoints) always describe the consumed data: a
    resume is exact whatever was prefetched. Cache decoding (pyarrow, zarr, numpy) releases
    the GIL, so threads overlap with the trainer's torch ops.

    Args:
        sampler: the step sampler (mutated as steps are consumed).
        source: indexable records (a cache reader or a list of samples).
        num_workers: threads (0: build each step inline).
        depth: steps prepared ahead.
        pack_length: pack each micro-batch's samples into rows of this many tokens (None: off).
        pin_memory: pin each collated batch (:meth:`Batch.pin_memory`) in the worker thread, for
            a CUDA trainer: its ``Batch.to`` copies are then asynchronous, and the pinning copy
            is made off the training thread. Only with ``num_workers > 0`` (inline, pinning
            would add a host copy to the step's critical path); needs a CUDA device.
    """

    def __init__(self, sampler: StepSampler, source, num_workers: int = 1, depth: int = 4,
                 pack_length: int | None = None, pin_memory: bool = False):
        self.sampler, self.source, self.depth, self.pack_length = sampler, source, depth, pack_length
        self.pool = ThreadPoolExecutor(num_workers, thread_name_prefix="kd-loader") if num_workers > 0 else None
        self.pin_memory = pin_memory and self.pool is not None
        self.pending: dict[tuple[int, int], Future] = {}

    def _build(self, micro: list[np.ndarray], pin: bool = False) -> list[Batch]:
        batches = [collate([self.source[int(i)] for i in idx], pack_length=self.pack_length) for idx in micro]
        return [b.pin_memory() for b in batches] if pin else batches

    def next_step(self) -> list[Batch]:
        """This rank's collated micro-batches for the next optimizer step."""
        if self.pool is None:
            return self._build(self.sampler.next_step())
        ahead = copy.copy(self.sampler)
        keys = []
        for _ in range(self.depth + 1):
            key = (ahead.epoch, ahead.position)
            micro = ahead.next_step()
            keys.append(key)
            if key not in self.pending:
                self.pending[key] = self.pool.submit(self._build, micro, self.pin_memory)
        for stale in set(self.pending) - set(keys):
            self.pending.pop(stale).cancel()
        self.sampler.next_step()
        return self.pending.pop(keys[0]).result()

    def close(self) -> None:
        if self.pool is not None:
            for f in self.pending.values():
                f.cancel()
            self.pending.clear()
            self.pool.shutdown(wait=True, cancel_futures=True)


def prefetch(items: Iterable, depth: int = 4) -> Iterator:
    """Iterate ``items`` with a background thread producing up to ``depth`` items ahead
    (exceptions are re-raised in the consumer)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for x in items:
                if stop.is_set():
                    return
                q.put(x)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 — handed to the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True, name="kd-prefetch")
    t.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.01)
