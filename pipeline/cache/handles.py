"""Open shard handles kept across block reads: a small LRU that evicts one handle at a time.

Opening a shard costs far more than reading one block of it (a parquet footer carries the
reader's 12-byte-per-sample index, ~24 KB for 2,048 samples, and is parsed on every open; a
zarr group reads its metadata documents). A cache of open handles that is emptied whole when
it fills makes almost every read of a large cache reopen its shard; evicting only the least
recently used handle keeps the shards being read now open, however many shards the cache has.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

H = TypeVar("H")

MAX_OPEN_SHARDS = 64
"""Handles kept open per cache (per thread for parquet): enough for every shard the loader
reads at once (one per shuffle stream plus the blocks prefetched ahead), few enough for the
process's file-descriptor limit with several reader threads."""


class HandleLRU(Generic[H]):
    """Up to ``capacity`` open handles keyed by shard path, least recently used evicted first
    (and closed, when ``close`` is given). Thread-safe: a handle is opened outside the lock, and
    threads asking for a shard another thread is opening wait for that one handle (a remote
    shard's footer or bytes are fetched once).

    Args:
        open_fn: key -> handle (its exceptions propagate to :meth:`get`, in the opening thread;
            a waiting thread then opens it again itself).
        capacity: handles kept (>= 1).
        close: handle -> None, called on each evicted handle.
    """

    def __init__(self, open_fn: Callable[[Hashable], H], capacity: int = MAX_OPEN_SHARDS,
                 close: Callable[[H], None] | None = None):
        if capacity < 1:
            raise ValueError(f"HandleLRU capacity {capacity} < 1")
        self.open_fn, self.capacity, self.close = open_fn, capacity, close
        self._items: OrderedDict[Hashable, H] = OrderedDict()
        self._lock = threading.Lock()
        self._opening: dict[Hashable, threading.Event] = {}
        self.opens = 0  # handles opened so far (benchmarks and tests)

    def get(self, key: Hashable) -> H:
        """The open handle of ``key``, opened now if it is not kept."""
        while True:
            with self._lock:
                h = self._items.get(key)
                if h is not None:
                    self._items.move_to_end(key)
                    return h
                opening = self._opening.get(key)
                if opening is None:
                    opening = self._opening[key] = threading.Event()
                    break
            opening.wait()  # then look again (it failed, or was evicted meanwhile)
        evicted = []
        try:
            h = self.open_fn(key)
            with self._lock:
                self.opens += 1
                self._items[key] = h
                while len(self._items) > self.capacity:
                    evicted.append(self._items.popitem(last=False)[1])
        finally:
            with self._lock:
                self._opening.pop(key, None)
            opening.set()
        for old in evicted:
            self._close(old)
        return h

    def _close(self, h: H) -> None:
        if self.close is not None:
            try:
                self.close(h)
            except Exception:  # noqa: BLE001 — a handle that cannot close is dropped all the same
                pass

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Close and forget every handle."""
        with self._lock:
            items, self._items = list(self._items.values()), OrderedDict()
        for h in items:
            self._close(h)
