"""How well each ``data.shuffle`` mixes a batch, against a uniform random permutation.

For the ``streams`` (default), ``global`` and ``block`` shuffles, built by train-student's own
:func:`pipeline.student.streams.build_sampler`, and for ``numpy.random.default_rng(seed)
.permutation(N)`` of the same samples (the reference), over every batch of epoch 0:

* **length spread**: the standard deviation of the sample lengths (tokens) within a batch,
  averaged over the batches; printed with its ratio to the uniform permutation's (goal >= 0.9:
  batches as mixed in length as random ones, so the gradient noise is the same);
* **position spread**: the standard deviation of ``index / N`` within a batch (a uniform batch
  gives about 0.29 = 1/sqrt(12)), and the distinct shards per batch;

for the global batch (``--world`` ranks × ``--micro-batch``; the ``streams`` steps are the same at
every world size dividing its stream count) and for one rank's micro-batch at ``--world`` ranks.

The samples: a cache's (``--cache DIR``: its lengths, blocks and shards), or by default a layout
like stage one's: ``--samples`` samples in shards of 2,048 and blocks of 32
(``cache.samples_per_shard``, ``cache.row_group_size``), lengths drawn log-normal in
[16, 512] tokens and sorted longest first within each window of 1,024 (stage one's
``length_sort_window``), so one block is one length band of one region.

Run (seconds; no cache needed)::

    .venv/bin/python bench/shuffle_quality.py [--samples 1000000] [--cache DIR]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config.train import TrainDataConfig  # noqa: E402
from pipeline.student.streams import build_sampler  # noqa: E402


class Layout:
    """What the samplers read of a cache: ``len``, ``block_ids()``, ``sample_shards()``, and the
    lengths the bench scores."""

    def __init__(self, lengths: np.ndarray, blocks: np.ndarray, shards: np.ndarray):
        self.lengths, self._blocks, self._shards = lengths, blocks, shards

    def __len__(self) -> int:
        return len(self.lengths)

    def block_ids(self) -> np.ndarray:
        return self._blocks

    def sample_shards(self) -> np.ndarray:
        return self._shards


def stage_one_layout(n: int, seed: int, shard: int = 2048, block: int = 32, window: int = 1024) -> Layout:
    """``n`` samples as stage one writes them (module docstring)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(120), 0.8, n)), 16, 512).astype(np.int64)
    for a in range(0, n, window):
        lengths[a:a + window] = -np.sort(-lengths[a:a + window])
    idx = np.arange(n)
    shards = idx // shard
    return Layout(lengths, shards * (shard // block + 1) + (idx % shard) // block, shards)


def cache_layout(path: str) -> Layout:
    from pipeline.cache import open_cache

    r = open_cache(path)
    return Layout(r.lengths().astype(np.int64), r.block_ids(), r.sample_shards())


def spread(batches: np.ndarray, layout: Layout) -> tuple[float, float, float]:
    """(mean within-batch std of lengths, of index / N, mean distinct shards) of (n, B) indices."""
    n = len(layout)
    shards = np.sort(layout.sample_shards()[batches], axis=1)
    distinct = 1 + (np.diff(shards, axis=1) != 0).sum(1)
    return (float(layout.lengths[batches].std(1).mean()), float((batches / n).std(1).mean()), float(distinct.mean()))


def orders(layout: Layout, mode: str, world: int, rank: int, mbs: int, seed: int) -> np.ndarray:
    """(steps, mbs) this rank's micro-batches of epoch 0 with ``data.shuffle: mode``."""
    data = TrainDataConfig(train_cache="bench", shuffle=mode)
    s, _ = build_sampler(data, layout, np.arange(len(layout)), None, mbs, 1, rank, world, seed)
    return np.stack([s.next_step()[0] for _ in range(s.steps_per_epoch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=10**6)
    ap.add_argument("--cache", default=None, help="score this cache's layout instead of a synthetic one")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    layout = cache_layout(args.cache) if args.cache else stage_one_layout(args.samples, args.seed)
    n, W, m = len(layout), args.world, args.micro_batch
    print(f"{n:,} samples ({'cache ' + args.cache if args.cache else 'stage-one layout'}), "
          f"lengths {int(layout.lengths.min())}-{int(layout.lengths.max())} tokens")
    rng = np.random.default_rng(args.seed)
    for label, B, world in ((f"global batch of {W * m} ({W} x {m})", W * m, W), (f"one rank's micro-batch of {m} at {W} ranks", m, W)):
        uniform = rng.permutation(n)[: n // B * B].reshape(-1, B)
        ref = spread(uniform, layout)
        print(f"\n{label}: mean within-batch std of length (ratio to uniform), of position / N, distinct shards")
        print(f"  uniform permutation  {ref[0]:7.1f} tokens          {ref[1]:.3f}         {ref[2]:6.1f}")
        for mode in ("streams", "global", "block"):
            if B == W * m:  # every rank's micro-batches of a step side by side: the global batch
                batches = np.concatenate([orders(layout, mode, world, r, m, args.seed) for r in range(world)], axis=1)
            else:
                batches = orders(layout, mode, world, 3 % world, m, args.seed)
            q = spread(batches, layout)
            print(f"  {mode:20} {q[0]:7.1f} tokens ({q[0] / ref[0]:.2f}x)  {q[1]:.3f} ({q[1] / ref[1]:.2f}x) {q[2]:6.1f}")


if __name__ == "__main__":
    main()
