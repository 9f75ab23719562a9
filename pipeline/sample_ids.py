"""Sample-ID bookkeeping in bounded memory: stable 64-bit hashes of sample IDs and a sorted
set of them (:class:`HashIndex`) that both stages use instead of Python sets and dicts of ID
strings (about 100 bytes per sample; a hash and a locator are 8 + 8 or fewer).

A 64-bit hash can collide (two of 10^8 IDs share a hash with probability about
``n² / 2^65`` ≈ 3·10⁻⁴), so a hash hit is only a *candidate*: every caller confirms it against
the actual ID strings (read back from the shard or dataset rows the locator points to) before
calling a sample a duplicate, done or found.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np


def id_hash(sample_id: str) -> int:
    """The stable 64-bit hash of ``sample_id``: the first 8 bytes of BLAKE2b (RFC 7693,
    ``hashlib.blake2b(digest_size=8)``) of its UTF-8 bytes, read little-endian. The same on every
    host, process and Python version (unlike ``hash()``, which is salted per process)."""
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "little")


def id_hashes(sample_ids: Iterable[str]) -> np.ndarray:
    """(n,) uint64 :func:`id_hash` of each ID, in order."""
    blake = hashlib.blake2b
    return np.frombuffer(b"".join(blake(s.encode(), digest_size=8).digest() for s in sample_ids),
                         dtype="<u8").astype(np.uint64)


class HashIndex:
    """A multiset of (hash, locator) pairs, kept as a few sorted runs of numpy arrays.

    ``hashes`` are uint64 (:func:`id_hashes`); ``locators`` are int64 values chosen by the caller
    that say where the ID behind a hash can be read back (a global sample index, a window
    number...). Runs are merged when a new run is at least half the size of the one before
    (a log-structured merge), so there are O(log n) runs and ``add`` costs amortised
    O(log² n) per pair. Memory: 8 bytes per hash plus the locator dtype's size (default int64,
    8 bytes); a merge briefly holds two copies of the runs it merges.

    Args:
        locator_dtype: numpy dtype of the locators (int32 halves their cost when they fit).
    """

    def __init__(self, locator_dtype=np.int64):
        self.locator_dtype = np.dtype(locator_dtype)
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (sorted hashes, locators in that order)

    def __len__(self) -> int:
        return sum(len(h) for h, _ in self._runs)

    @property
    def nbytes(self) -> int:
        """Bytes held by the runs' arrays."""
        return sum(h.nbytes + loc.nbytes for h, loc in self._runs)

    def add(self, hashes: np.ndarray, locators: np.ndarray) -> None:
        """Insert the pairs ``(hashes[i], locators[i])``; (n,) arrays of equal length."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        locators = np.asarray(locators).astype(self.locator_dtype, copy=False)
        if len(hashes) != len(locators):
            raise ValueError(f"HashIndex.add: {len(hashes)} hashes but {len(locators)} locators")
        if not len(hashes):
            return
        order = np.argsort(hashes, kind="stable")
        self._runs.append((hashes[order], locators[order]))
        while len(self._runs) > 1 and 2 * len(self._runs[-1][0]) >= len(self._runs[-2][0]):
            (h1, l1), (h2, l2) = self._runs[-2], self._runs.pop()
            h, loc = np.concatenate([h1, h2]), np.concatenate([l1, l2])
            order = np.argsort(h, kind="stable")  # two sorted runs: timsort merges them in O(n)
            self._runs[-1] = (h[order], loc[order])

    def repeated(self) -> list[np.ndarray]:
        """The locators of every hash stored more than once, one array per such hash (the
        runs are merged into one first). Candidates only: confirm against the IDs."""
        if len(self._runs) > 1:
            h = np.concatenate([r[0] for r in self._runs])
            loc = np.concatenate([r[1] for r in self._runs])
            order = np.argsort(h, kind="stable")
            self._runs = [(h[order], loc[order])]
        if not self._runs:
            return []
        h, loc = self._runs[0]
        out: list[np.ndarray] = []
        end = -1
        for j in np.flatnonzero(h[1:] == h[:-1]).tolist():  # h[j] == h[j + 1]; usually none
            if j < end:
                continue
            end = j + 1
            while end < len(h) and h[end] == h[j]:
                end += 1
            out.append(loc[j:end])
        return out

    def candidates(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every stored pair whose hash equals one of ``hashes`` ((m,) uint64).

        Returns:
            (query positions (c,) int64, their locators (c,)): pair ``j`` says that
            ``hashes[pos[j]]`` is stored with locator ``loc[j]`` (a query hash stored several
            times appears several times). Candidates only: confirm against the IDs.
        """
        hashes = np.asarray(hashes, dtype=np.uint64)
        pos_out, loc_out = [np.zeros(0, np.int64)], [np.zeros(0, self.locator_dtype)]
        for h, loc in self._runs:
            lo = np.searchsorted(h, hashes, side="left")
            hi = np.searchsorted(h, hashes, side="right")
            for q in np.flatnonzero(hi > lo):
                pos_out.append(np.full(hi[q] - lo[q], q, np.int64))
                loc_out.append(loc[lo[q]:hi[q]])
        return np.concatenate(pos_out), np.concatenate(loc_out)


def repeated_hashes(hashes: np.ndarray) -> np.ndarray:
    """Positions ``i`` of ``hashes`` ((n,) uint64) whose value also occurs at another position,
    each group in ascending order: the candidates for duplicates within one batch of IDs.

    Returns:
        (m,) int64 positions, grouped by hash (the groups in ascending hash order).
    """
    order = np.argsort(hashes, kind="stable")
    s = hashes[order]
    same = s[1:] == s[:-1]
    dup = np.zeros(len(s), dtype=bool)
    dup[1:] |= same
    dup[:-1] |= same
    return order[dup].astype(np.int64)
