"""Several teacher caches read as one: the union of their samples with IDs ``"{c}:{id}"``, and
the per-sample weights that give cache c a fixed share of the draws (``data.train_caches``).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.cache.reader import CacheReader

MATCHED_FIELDS = ("tokenizer_fingerprint", "vocab_size", "target_type", "k", "temperature")
"""Manifest fields every cache of a mixture must share: the same teacher vocabulary and the
same kind of targets, so that records of any cache collate into one micro-batch and enter one
loss."""


def check_compatible(readers: list[CacheReader], paths: list[str]) -> None:
    """Refuse caches that cannot be mixed.

    Raises:
        ValueError: a cache's tokenizer fingerprint, vocabulary size, target type, k or
            temperature differs from the first cache's (one line naming both paths and the field).
    """
    first = readers[0].manifest
    for path, r in zip(paths[1:], readers[1:]):
        for name in MATCHED_FIELDS:
            a, b = getattr(first, name), getattr(r.manifest, name)
            if a != b:
                raise ValueError(f"data.train_caches: {path} has {name} {b!r}, {paths[0]} has {a!r}; the caches "
                                 "of a mixture need the same teacher tokenizer and targets")


class CacheMixture:
    """Random access over the union of several caches, in list order (cache 0's samples,
    then cache 1's, ...); record ``sample_id`` s of cache c reads ``"{c}:{s}"``.

    Offers what the student's data path uses of a :class:`CacheReader`: ``len``, indexing,
    ``index_of``, ``lengths``, ``block_ids``, ``manifest`` (the first cache's) and
    ``sample_ids``.

    Args:
        readers: the open caches (:func:`check_compatible` first).
        weights: (C,) positive relative share of each cache.
    """

    def __init__(self, readers: list[CacheReader], weights: list[float]):
        if len(readers) != len(weights):
            raise ValueError(f"{len(readers)} caches but {len(weights)} weights")
        self.readers, self.weights = readers, np.asarray(weights, dtype=np.float64)
        self.manifest = readers[0].manifest
        sizes = np.array([len(r) for r in readers], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])
        self.cache_of = np.repeat(np.arange(len(readers)), sizes)  # (N,) cache of every sample
        self.sample_ids = [f"{c}:{s}" for c, r in enumerate(readers) for s in r.sample_ids]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int):
        c = int(self.cache_of[i])
        rec = self.readers[c][int(i - self.starts[c])]
        return dataclasses.replace(rec, sample_id=f"{c}:{rec.sample_id}")

    def index_of(self, sample_id: str) -> int:
        """Position of ``"{c}:{id}"`` in the union.

        Raises:
            KeyError: not of that form, c out of range, or no such ID in cache c (named).
        """
        head, sep, rest = sample_id.partition(":")
        if not sep or not head.isdigit() or int(head) >= len(self.readers):
            raise KeyError(f"data.train_caches: sample_id {sample_id!r} is not '<cache number>:<id>' "
                           f"with a cache number below {len(self.readers)}")
        c = int(head)
        return int(self.starts[c]) + self.readers[c].index_of(rest)

    def lengths(self) -> np.ndarray:
        """(N,) int64 token count of every sample."""
        return np.concatenate([r.lengths() for r in self.readers])

    def block_ids(self) -> np.ndarray:
        """(N,) int64 block number of every sample, numbered across the caches."""
        out, base = [], 0
        for r in self.readers:
            b = r.block_ids()
            out.append(b + base)
            base += int(b.max()) + 1 if len(b) else 0
        return np.concatenate(out)

    def draw_weights(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices),) float64 probability ``w_c / (N_c · Σ_c' w_c')`` of each sample, where
        N_c counts the entries of ``indices`` from cache c and the sum runs over the caches
        present: drawn with these probabilities, cache c gets a fraction ``w_c / Σ w`` of the
        draws in expectation whatever its size, uniform within the cache — the with-replacement
        mixture GKD (Agarwal et al. 2024) uses to mix fixed and on-policy data with rate λ."""
        cache = self.cache_of[indices]
        counts = np.bincount(cache, minlength=len(self.readers))
        present = counts > 0
        return self.weights[cache] / (counts[cache] * float(self.weights[present].sum()))
