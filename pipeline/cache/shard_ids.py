"""The sample IDs of a cache's closed shards in bounded memory: one sorted array of their
64-bit hashes with the global sample index of each (:class:`ShardIds`), confirmed against the
shards' own ID columns on every hash hit. Used by resume (which samples are done) and by the
cache reader (``index_of`` and the duplicate check at open).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np

from pipeline.cache.manifest import ShardEntry
from pipeline.sample_ids import HashIndex, id_hashes
from pipeline.storage import Folder

ID_SHARDS_KEPT = 4
"""Shards whose ID strings :class:`ShardIds` keeps after confirming a hit (an LRU): resume
confirms every done sample, and consecutive windows hit the same few shards."""


class ShardIds:
    """Hash → global sample index over closed shards, with the IDs read back to confirm.

    Global sample index ``i`` is row ``i - starts[s]`` of shard ``s`` (shards in the given
    order). Memory: 8 bytes of hash plus 4 (fewer than 2^31 samples) or 8 bytes of index per
    sample, and the ID strings of at most :data:`ID_SHARDS_KEPT` shards. Picklable (rank 0
    builds it at resume and broadcasts it): the backend is rebuilt from its name on arrival.

    Args:
        cache_dir: the cache directory or store URL. backend: its ``cache.backend`` name.
        compression: its codec (to rebuild the backend). files: shard file names.
        hashes: per shard, (n_s,) uint64 ID hashes in storage order.
    """

    def __init__(self, cache_dir: str | os.PathLike, backend: str, compression: str, files: list[str],
                 hashes: list[np.ndarray]):
        self.cache_dir, self.backend_name, self.compression = str(cache_dir), backend, compression
        self.files = list(files)
        counts = np.array([len(h) for h in hashes], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (S+1,)
        n = int(self.starts[-1])
        self.index = HashIndex(np.int32 if n < 2**31 else np.int64)
        if n:
            self.index.add(np.concatenate(hashes), np.arange(n))
        self._init_cache()

    def _init_cache(self) -> None:
        self._backend = None
        self._ids: OrderedDict[int, list[str]] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_backend", "_ids", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def nbytes(self) -> int:
        """Resident bytes of the hash index and shard offsets (not the LRU of ID strings)."""
        return self.index.nbytes + self.starts.nbytes

    def shard_of(self, i: int) -> int:
        """The shard (position in ``files``) holding global sample ``i``."""
        return int(np.searchsorted(self.starts, i, side="right") - 1)

    def shard_ids(self, s: int) -> list[str]:
        """The ID strings of shard ``s`` in storage order (read once, kept in a small LRU)."""
        with self._lock:
            if s in self._ids:
                self._ids.move_to_end(s)
                return self._ids[s]
            if self._backend is None:
                from pipeline.cache.lifecycle import backend_for  # lifecycle imports this module

                self._backend = backend_for(self.backend_name, self.compression)
            ids = self._backend.read_column(Folder(self.cache_dir).shard(self.files[s]), "sample_id")
            self._ids[s] = ids
            while len(self._ids) > ID_SHARDS_KEPT:
                self._ids.popitem(last=False)
            return ids

    def id_at(self, i: int) -> str:
        """The sample ID at global index ``i`` (read from its shard)."""
        s = self.shard_of(i)
        return self.shard_ids(s)[i - int(self.starts[s])]

    def find(self, sample_ids: list[str], hashes: np.ndarray | None = None) -> np.ndarray:
        """(n,) int64 global index of each ID, -1 where the shards do not hold it. A hash hit
        counts only once the ID read back from its shard is equal (collision-safe)."""
        if hashes is None:
            hashes = id_hashes(sample_ids)
        out = np.full(len(sample_ids), -1, dtype=np.int64)
        pos, loc = self.index.candidates(hashes)
        for p, i in sorted(zip(pos.tolist(), loc.tolist()), key=lambda t: t[1]):  # shard by shard
            if out[p] < 0 and self.id_at(i) == sample_ids[p]:
                out[p] = i
        return out

    def first_duplicate(self) -> tuple[str, int, int] | None:
        """``(sample ID, global index of its first copy, of its second copy)`` for the ID whose
        second copy comes first in storage order, or None. Equal hashes are confirmed by
        comparing the ID strings."""
        best = None
        for members in self.index.repeated():
            seen: dict[str, int] = {}
            for i in sorted(members.tolist()):
                sid = self.id_at(i)
                if sid in seen:
                    if best is None or i < best[2]:
                        best = (sid, seen[sid], i)
                    break
                seen[sid] = i
        return best


def shard_ids_of(cache_dir: str | os.PathLike, backend, backend_name: str, compression: str,
                 shards: list[ShardEntry]) -> ShardIds:
    """:class:`ShardIds` of ``shards``, their hashes read with ``backend``
    (:func:`~pipeline.cache.shards.shard_id_hashes`: one small column per shard)."""
    from pipeline.cache.shards import shard_id_hashes

    folder = Folder(cache_dir)
    hashes = [shard_id_hashes(backend, folder.shard(s.file)) for s in shards]
    return ShardIds(cache_dir, backend_name, compression, [s.file for s in shards], hashes)
