"""The ``streams`` shuffle: disjoint cache blocks per rank, mixed through a shuffle buffer.

Per epoch ``e`` (everything drawn from ``numpy.random.default_rng([seed, e, STREAMS_TAG])``):

1. **Block sequence.** The cache's shards are put in a random order and, inside each shard, its
   blocks (parquet row groups / zarr row runs) too; the samples to train on, block after block
   in that order, form one sequence.
2. **Streams.** The sequence is cut into ``S`` equal contiguous parts (``S`` = ``streams``, the
   canonical partition of MosaicML Streaming's shuffles): stream ``v`` reads its shards one
   after another, each block once. A block cut by a part boundary belongs to two streams.
3. **Shuffle buffer.** Inside stream ``v`` (its own generator ``[seed, e, STREAMS_TAG, v]``), the
   sample of the ``i``-th block it visits gets the key ``i + U·window``, ``U ~ Uniform[0, 1)``,
   and the stream is read in key order: every sample is drawn while ``window + 1`` blocks are
   open, from blocks in random places of random shards (so from every length band of stage
   one's length-sorted windows), the idea of MosaicML's ``py1e`` with one block as unit.
4. **Global sequence.** Position ``q`` of the epoch is sample ``q // S`` of stream ``q mod S``;
   optimizer step ``t`` takes positions ``[t·B, (t+1)·B)`` (``B`` the global batch) and rank
   ``r`` of ``W`` the positions ``q ≡ r (mod W)`` among them, i.e. only the samples of the
   streams ``v ≡ r (mod W)`` (``S`` a multiple of ``W``).

So a rank decodes only its own streams' blocks, each once per epoch (plus, at most, the one
block each of its streams shares with a neighbour), and its reader needs
``(S / W) · (window + 2)`` decoded blocks in memory. Every step's global sample set depends on
``(seed, epoch, S, window)`` and the step only, never on ``W`` or the micro-batch size: with
the same ``S``, 1 rank and 2 ranks (and a resume from one to the other) train on the same
samples per step, the one-big-batch gradient of the trainer makes them the same update up to
float32 summation order. The tail of an epoch that fills no global batch (and the last
``n mod S`` samples of the block sequence) is dropped, every rank making the same calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

STREAMS_TAG = 0x7374726D
"""Third word of the streams shuffle's seeds (``"strm"`` in ASCII): apart from the global
shuffle's ``[seed, epoch]``."""

DEFAULT_STREAMS = 8
"""Streams when ``data.shuffle_streams`` is unset: rounded up to a multiple of the world size,
so 1, 2, 4 and 8 ranks read the same steps."""


def default_streams(world_size: int) -> int:
    """``DEFAULT_STREAMS`` rounded up to a multiple of ``world_size`` (8 for 1, 2, 4, 8 ranks;
    9 for 3; 16 for 16)."""
    return world_size * -(-DEFAULT_STREAMS // world_size)


@dataclass
class StreamSampler:
    """Yields, per optimizer step, this rank's micro-batches of sample indices, in the
    ``streams`` order (module docstring). The same interface as
    :class:`pipeline.student.sampler.StepSampler`: ``epoch``/``position`` (global samples
    consumed in the epoch) are the data position a checkpoint saves; setting them resumes
    exactly, at any world size that divides ``streams``.

    Args:
        indices: (N,) int64 dataset indices to train on, ascending.
        groups: (N,) int64 block of each entry of ``indices`` (non-decreasing: blocks in storage
            order), e.g. ``reader.block_ids()[indices]``.
        regions: (N,) int64 shard of each entry (non-decreasing), or None: every block is its
            own region (no file locality).
        streams: ``S``, a multiple of ``world_size``. window: blocks a stream's buffer spans (>= 1).

    Raises:
        ValueError: ``streams`` not a positive multiple of ``world_size``; ``groups`` / ``regions``
            not of ``indices``' length or decreasing; fewer samples than one global batch.
    """

    indices: np.ndarray
    micro_batch_size: int
    grad_accum_steps: int
    rank: int
    world_size: int
    seed: int
    groups: np.ndarray
    regions: np.ndarray | None = None
    streams: int = DEFAULT_STREAMS
    window: int = 16
    epoch: int = 0
    position: int = 0
    global_batch: int = field(init=False)
    """Samples per optimizer step over all ranks (``B``)."""
    samples_per_stream: int = field(init=False)
    steps_per_epoch: int = field(init=False)
    _order: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        n, W = len(self.indices), self.world_size
        if self.streams < 1 or self.streams % W:
            raise ValueError(f"data.shuffle_streams={self.streams} is not a positive multiple of the world size {W}")
        if self.window < 1:
            raise ValueError(f"data.shuffle_window={self.window} < 1")
        # blocks as runs of equal group: (G+1,) offsets into indices, (G,) region of each run
        groups = np.asarray(self.groups)
        if len(groups) != n or (n and np.any(np.diff(groups) < 0)):
            raise ValueError(f"streams shuffle: groups must be {n} non-decreasing block numbers (storage order)")
        starts = np.flatnonzero(np.diff(groups)) + 1 if n else np.zeros(0, np.int64)
        self._run_starts = np.concatenate([[0], starts, [n]]).astype(np.int64)
        if self.regions is None:
            self._run_region = np.arange(len(self._run_starts) - 1, dtype=np.int64)
        else:
            regions = np.asarray(self.regions)
            if len(regions) != n or (n and np.any(np.diff(regions) < 0)):
                raise ValueError(f"streams shuffle: regions must be {n} non-decreasing shard numbers")
            self._run_region = np.unique(regions[self._run_starts[:-1]], return_inverse=True)[1].astype(np.int64)
        self.groups = self.regions = None  # the runs replace them: no per-sample array kept
        self.global_batch = B = self.micro_batch_size * self.grad_accum_steps * W
        self.samples_per_stream = n // self.streams
        self.steps_per_epoch = self.samples_per_stream * self.streams // B
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} training samples are fewer than one global batch "
                             f"(micro_batch_size × grad_accum_steps × world_size = {B})")

    def block_sequence(self, epoch: int) -> np.ndarray:
        """(G,) the blocks (runs of ``groups``) in the epoch's visiting order: shards shuffled,
        blocks shuffled inside each shard."""
        rng = np.random.default_rng([self.seed, epoch, STREAMS_TAG])
        region_rank = rng.permutation(int(self._run_region.max()) + 1 if len(self._run_region) else 0)
        return np.lexsort((rng.random(len(self._run_region)), region_rank[self._run_region]))

    def stream_order(self, epoch: int, v: int, seq: np.ndarray | None = None) -> np.ndarray:
        """(samples_per_stream,) int64 dataset indices of stream ``v`` in drawing order."""
        seq = self.block_sequence(epoch) if seq is None else seq
        counts = np.diff(self._run_starts)[seq]
        cum = np.concatenate([[0], np.cumsum(counts)])  # (G+1,) sequence offset of each visited block
        n_s = self.samples_per_stream
        pos = np.arange(v * n_s, (v + 1) * n_s, dtype=np.int64)  # this stream's part of the sequence
        j = np.searchsorted(cum, pos, side="right") - 1  # visited block of each sample
        samples = self.indices[self._run_starts[seq[j]] + (pos - cum[j])]
        visit = (j - j[0]).astype(np.float64) if n_s else j.astype(np.float64)
        rng = np.random.default_rng([self.seed, epoch, STREAMS_TAG, v])
        return samples[np.argsort(visit + rng.random(n_s) * self.window, kind="stable")]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(samples_per_stream·S / W,) int64 this rank's sample indices of ``epoch`` in visiting
        order: entry ``t`` is global position ``rank + t·W`` (memoised for the two latest epochs;
        8 bytes per sample of the rank's share)."""
        if epoch not in self._order:
            seq = self.block_sequence(epoch)
            mine = [self.stream_order(epoch, v, seq) for v in range(self.rank, self.streams, self.world_size)]
            order = np.stack(mine, axis=1).reshape(-1)  # entry j·(S/W) + u: sample j of my u-th stream
            for old in sorted(self._order)[:-1]:  # keep the latest other epoch (a prefetcher runs ahead)
                del self._order[old]
            self._order[epoch] = order
        return self._order[epoch]

    def next_step(self) -> list[np.ndarray]:
        """This rank's ``grad_accum_steps`` micro-batches for the next optimizer step."""
        if self.position + self.global_batch > self.steps_per_epoch * self.global_batch:
            self.epoch, self.position = self.epoch + 1, 0
        W = self.world_size
        mine = self.epoch_order(self.epoch)[self.position // W: (self.position + self.global_batch) // W]
        self.position += self.global_batch
        m = self.micro_batch_size
        return [mine[i * m: (i + 1) * m] for i in range(self.grad_accum_steps)]


def build_sampler(data, src, indices: np.ndarray, weights: np.ndarray | None, micro_batch_size: int,
                  grad_accum_steps: int, rank: int, world_size: int, seed: int):
    """The round's sampler for ``data.shuffle`` (``data``: a
    :class:`~pipeline.config.train.TrainDataConfig`) and a one-line description of the order it
    draws (printed, and saved with checkpoints to notice a resume into another order). With
    ``streams`` a cache reader is told it is read shard by shard
    (:meth:`~pipeline.cache.CacheReader.read_shards_whole`).

    ``streams`` needs cache blocks and draws without weights: a dataset source or weighted draws
    (loss weights, a mixture of caches) are drawn with ``global`` instead, and the description
    says why (a resolved config, as the rounds driver writes it, names the default explicitly,
    so the choice cannot depend on whether the key was set).

    Args:
        src: the training source (``block_ids`` and ``sample_shards`` where it is a cache).
        indices: (N,) int64 ascending indices to train on. weights: (N,) draw weights or None.

    Raises:
        ConfigError: ``data.shuffle=block`` with a dataset; ``data.shuffle_streams`` not a
            multiple of the world size.
    """
    from pipeline.config import ConfigError
    from pipeline.student.sampler import StepSampler

    mode, blocks, why = data.shuffle, hasattr(src, "block_ids"), ""
    if mode == "streams" and (weights is not None or not blocks):
        mode = "global"
        why = " (streams cannot serve " + ("weighted draws)" if blocks else "a dataset)")
    if mode == "block" and not blocks:
        raise ConfigError("data.shuffle=block needs data.train_cache (a dataset has no blocks)")
    common = (micro_batch_size, grad_accum_steps, rank, world_size, seed)
    if mode != "streams":
        groups = src.block_ids()[indices] if mode == "block" else None
        sampler = StepSampler(indices, *common, weights=weights, groups=groups, window=data.shuffle_window)
        return sampler, ("global" + why if mode == "global" else f"block (window {data.shuffle_window})")
    streams = data.shuffle_streams or default_streams(world_size)
    if streams % world_size:
        raise ConfigError(f"data.shuffle_streams={streams} is not a multiple of the world size {world_size}")
    shards = getattr(src, "sample_shards", None)
    if hasattr(src, "read_shards_whole"):  # every block of a shard is read within a short time
        src.read_shards_whole()
    sampler = StreamSampler(indices, *common, groups=src.block_ids()[indices],
                            regions=None if shards is None else shards()[indices],
                            streams=streams, window=data.shuffle_window)
    return sampler, f"streams ({streams} streams, window {data.shuffle_window} blocks)"
