"""The cache reader over closed shards: the sample-ID hash index built from the shards' indexes,
random access through a byte-bounded LRU of decoded blocks, sequential streaming, and integrity
checks (page checksums as blocks are decoded, or a lazy per-shard SHA-256).
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.cache.codec import decode_targets
from pipeline.cache.manifest import Manifest, ShardEntry
from pipeline.cache.records import Block, CacheRecord, check_block
from pipeline.cache.shard_ids import ShardIds
from pipeline.cache.shards import ShardBackend, ShardIndex, dir_sha256, encoding_of
from pipeline.storage import Folder, RemotePath, store_error


class CacheReader:
    """Random access by index or sample ID, and sequential streaming, over closed shards.

    Opening reads only the shard list (manifest / markers, passed in) and each shard's index
    (lengths, ID hashes, block starts): its I/O does not grow with the cache's bytes, so every
    rank of every start and resume opens at the cost of the indexes. The reader keeps about
    16 bytes per sample (a 4-byte length, an 8-byte ID hash and its 4-byte sample index:
    :class:`~pipeline.cache.shard_ids.ShardIds`); ID strings are read with each block, and by
    ``index_of`` from the one shard its hash points to (collision-safe). Targets are decoded one
    block (a parquet row group / a run of zarr rows) at a time and kept in an LRU bounded by
    ``max_cached_bytes`` of decoded arrays, so random access costs one block decode per
    miss and a cache that fits is decoded once.

    Integrity with ``verify`` (the default), without hashing a whole shard before its first
    block can be used:

    * a shard whose pages carry checksums (parquet written by this version:
      ``ShardIndex.page_checksums``) is checked page by page as its blocks are decoded (the
      backend verifies each page's CRC-32, locally and from a bucket); only when a block of it
      fails to decode is the shard hashed, so a changed file is reported as a checksum mismatch;
    * any other shard (zarr, older parquet) has its SHA-256 (:func:`dir_sha256`, over all its
      bytes) checked against its marker lazily, the first time any block of it is read, once
      per shard per reader (concurrent first reads hash it once); a local cache only: a remote
      shard would be downloaded whole;
    * a mismatch is remembered and raised on every later read of the shard; a shard whose index
      cannot be read at open is hashed then, so a truncated or overwritten file is reported as
      a checksum mismatch rather than as unreadable;
    * each decoded block is validated (:func:`check_block`).

    What page checksums do not catch, the SHA-256 does: a shard replaced whole by another valid
    shard of the same sample and token counts. :meth:`validate` (``inspect-cache --validate``)
    checks every shard's SHA-256 and every block. Thread-safe.

    Raises:
        FileNotFoundError: (open) a listed shard is missing.
        ValueError: (open) a shard's index is unreadable, its row count differs from its
            marker, duplicate sample IDs, sample count differs from a complete manifest;
            (first read of a shard, ``verify``) its checksum differs from its marker
            ("checksum mismatch", cache dir and shard file named); (read) a block is
            unreadable or holds an invalid record (shard and sample ID named).
        StoreError: (open, read; store) a request failed: unreachable endpoint, refused
            credentials, throttling (the shard's URL and the cause named; not taken for a
            corrupt shard).
    """

    def __init__(self, backend: ShardBackend, cache_dir: str | os.PathLike, manifest: Manifest,
                 shards: list[ShardEntry], verify: bool = True, max_cached_bytes: int = 2 << 30):
        self.backend, self.manifest, self.shards = backend, manifest, shards
        self.folder = Folder(cache_dir)
        self.dir = self.folder.path  # named in messages
        self.enc = encoding_of(manifest)
        self.verify, self.max_cached_bytes = verify, max_cached_bytes
        # a remote shard's lazy checksum would download it whole: objects are written whole and
        # checked by the store (PUT is atomic); validate() still hashes every byte
        self.verify_checksums = verify and not self.folder.is_remote
        if not shards:
            raise ValueError(f"cache {self.dir}: no closed shard")
        self.index: list[ShardIndex] = []
        present = set(self.folder.list())  # one listing
        for s in shards:
            self.index.append(self._read_index(s, present))
        # per sample, resident: 4 B of length, 8 B of ID hash and 4 B (8 B from 2^31 samples) of
        # its index in the hash order; the ID strings stay in the shards (read per block)
        self._lengths = np.concatenate([ix.num_tokens for ix in self.index]).astype(np.int32, copy=False)
        self.ids = ShardIds(cache_dir, manifest.backend, manifest.compression, [s.file for s in shards],
                            [ix.id_hashes for ix in self.index])
        self.shard_starts = self.ids.starts  # (S+1,) int64: shard s holds samples [starts[s], starts[s+1])
        for s, ix in enumerate(self.index):  # views of the one lengths array; hashes now live in self.ids
            ix.num_tokens, ix.id_hashes = self._lengths[self.shard_starts[s]:self.shard_starts[s + 1]], None
        dup = self.ids.first_duplicate()
        if dup is not None:
            raise ValueError(f"cache {self.dir}: duplicate sample_id {dup[0]!r} in shards "
                             f"{self.shard_name(dup[1])} and {self.shard_name(dup[2])}")
        if manifest.complete and len(self) != manifest.num_samples:
            raise ValueError(f"cache {self.dir}: manifest says {manifest.num_samples} samples, shards hold {len(self)}")
        self._lru: OrderedDict[tuple[int, int], Block] = OrderedDict()
        self._lru_bytes = 0
        self._lock = threading.Lock()
        self._loading: dict[tuple[int, int], threading.Event] = {}  # blocks being read now
        # lazy checksums: None = not checked yet, "" = matches, else the mismatch message
        self._sha_state: list[str | None] = [None] * len(shards)
        self._sha_locks = [threading.Lock() for _ in shards]  # one per shard: others are read meanwhile

    def _raise_store_failure(self, e: Exception, path) -> None:
        """Raise ``e`` as a :class:`~pipeline.storage.StoreError` naming the shard's URL and the
        cause when it is a failed store request (unreachable endpoint, refused credentials,
        throttling...); return otherwise (and always for a local cache)."""
        err = store_error(e, str(path), getattr(self.folder.remote.fs, "retries", None)) if self.folder.is_remote else None
        if err is not None:
            raise err from None

    def _read_index(self, s: ShardEntry, present: set[str]) -> ShardIndex:
        """Shard ``s``'s index, checked against its marker (errors as the class says)."""
        if s.file not in present:
            raise FileNotFoundError(f"cache {self.dir}: shard {s.file} listed but missing")
        try:
            ix = self.backend.read_index(self.shard_path(s.file))
        except Exception as e:  # noqa: BLE001 — any decoder error means an unreadable shard
            self._raise_store_failure(e, self.shard_path(s.file))  # a failed request is not a corrupt shard
            if self.verify:  # a changed file is named as such (the hash is paid only on this failure)
                self._check_sha256(s)
            raise ValueError(f"cache {self.dir}: shard {s.file} unreadable ({type(e).__name__}: {e})") from None
        n_tok = int(ix.num_tokens.sum(dtype=np.int64))
        if len(ix) != s.num_samples or n_tok != s.num_tokens:
            raise ValueError(f"cache {self.dir}: shard {s.file} holds {len(ix)} samples / "
                             f"{n_tok} tokens, its marker says {s.num_samples} / {s.num_tokens}")
        return ix

    # ------------------------------------------------------------------ checksums
    def _check_sha256(self, entry: ShardEntry) -> None:
        """Hash one shard now and raise ValueError ("checksum mismatch", cache and shard named)
        if it differs from ``entry.sha256``."""
        if dir_sha256(self.shard_path(entry.file)) != entry.sha256:
            raise ValueError(f"cache {self.dir}: shard {entry.file} checksum mismatch "
                             "(file changed, truncated or corrupt)")

    def shard_path(self, name: str) -> Path | RemotePath:
        """Where the backend reads shard ``name``: a local path or a remote shard."""
        return self.folder.shard(name)

    def verify_shard(self, shard: int) -> None:
        """Check shard ``shard``'s SHA-256 against its marker, once per reader (later calls
        return at once, or raise the same error again). Thread-safe: concurrent callers of one
        shard wait for a single hash.

        Raises:
            ValueError: checksum mismatch (cache dir and shard file named).
        """
        state = self._sha_state[shard]
        if state is None:
            with self._sha_locks[shard]:
                state = self._sha_state[shard]
                if state is None:
                    try:
                        self._check_sha256(self.shards[shard])
                        state = ""
                    except ValueError as e:
                        state = str(e)
                    self._sha_state[shard] = state
        if state:
            raise ValueError(state)

    # ------------------------------------------------------------------ index
    def __len__(self) -> int:
        return int(self.shard_starts[-1])

    @property
    def sample_ids(self) -> list[str]:
        """Every sample ID in storage order, read from the shards now (O(N) strings: for
        inspection and tests; training reads IDs per block)."""
        return [sid for s in range(len(self.shards)) for sid in self.ids.shard_ids(s)]

    @property
    def teacher_nll_sum(self) -> np.ndarray:
        """(N,) float64 teacher NLL sum (nats) of every sample, read from the shards now."""
        cols = [self.backend.read_column(self.shard_path(s.file), "teacher_nll_sum") for s in self.shards]
        return np.concatenate(cols).astype(np.float64, copy=False)

    @property
    def nbytes(self) -> int:
        """Resident bytes of the reader's per-sample index (lengths, ID hashes, block starts)."""
        return self._lengths.nbytes + self.ids.nbytes + sum(ix.block_starts.nbytes for ix in self.index)

    def indices_of(self, sample_ids: list[str]) -> np.ndarray:
        """(n,) int64 position of each ID (hashes looked up, every hit confirmed against the ID
        read back from its shard, shard by shard). Raises KeyError naming the cache and the first
        ID it does not hold."""
        found = self.ids.find(list(sample_ids))
        if (found < 0).any():
            raise KeyError(f"cache {self.dir}: no sample_id {sample_ids[int(np.argmax(found < 0))]!r}")
        return found

    def index_of(self, sample_id: str) -> int:
        """Position of ``sample_id`` (:meth:`indices_of`). Raises KeyError naming the cache and ID."""
        return int(self.indices_of([sample_id])[0])

    def lengths(self) -> np.ndarray:
        """(N,) int32 token count of every sample (sum with ``dtype=np.int64``)."""
        return self._lengths

    def shard_name(self, i: int) -> str:
        """The file name of the shard holding sample ``i``."""
        return self.shards[self.ids.shard_of(i)].file

    def block_ids(self) -> np.ndarray:
        """(N,) int64 global block number of every sample (the unit the LRU caches)."""
        out, base = [], 0
        for s, ix in enumerate(self.index):
            out.append(base + np.repeat(np.arange(self.num_blocks(s)), np.diff(ix.block_starts)))
            base += self.num_blocks(s)
        return np.concatenate(out).astype(np.int64)

    def read_shards_whole(self, enabled: bool = True) -> None:
        """Tell the backend that blocks are read shard by shard (every block of a shard within
        a short time, as the ``streams`` shuffle does): from a store, a parquet shard of at most
        :data:`pipeline.cache.parquet.WHOLE_SHARD_BYTES` is then fetched in one request on its
        first read. No effect on a local cache or a zarr one."""
        if hasattr(self.backend, "whole_shards"):
            self.backend.whole_shards = enabled

    def sample_shards(self) -> np.ndarray:
        """(N,) int64 shard (position in ``shards``) of every sample: the unit a loader keeps
        open, :class:`~pipeline.student.streams.StreamSampler`'s regions."""
        return np.repeat(np.arange(len(self.shards), dtype=np.int64), np.diff(self.shard_starts))

    # ------------------------------------------------------------------ blocks
    def num_blocks(self, shard: int) -> int:
        """Number of blocks (row groups / zarr row runs) of shard ``shard``."""
        return len(self.index[shard].block_starts) - 1

    def read_block(self, shard: int, block: int) -> Block:
        """Decode (and validate) one block, bypassing the LRU. With ``verify`` the shard's
        checksum is checked first, on the first read of the shard (:meth:`verify_shard`), unless
        its pages carry checksums (then each page is checked as it is decoded, and the shard is
        hashed only when a block fails to decode).

        Raises:
            ValueError: checksum mismatch, unreadable block, invalid record (shard named).
            StoreError: (store) reading the block failed: unreachable endpoint, refused
                credentials, throttling (the shard's URL and the cause named).
        """
        ix, name = self.index[shard], self.shards[shard].file
        if self.verify_checksums and not ix.page_checksums:
            self.verify_shard(shard)
        try:
            a = self.backend.read_block(self.shard_path(name), ix, block)
            ids, vals, tail = decode_targets(a, self.enc)
        except Exception as e:  # noqa: BLE001
            self._raise_store_failure(e, self.shard_path(name))  # a failed request is not a corrupt block
            if self.verify_checksums:  # a page checksum failed, or the file changed: named as such
                self.verify_shard(shard)
            raise ValueError(f"cache {self.dir}: shard {name} block {block} unreadable ({type(e).__name__}: {e})") from None
        lo, hi = ix.block_starts[block], ix.block_starts[block + 1]
        n_tok = ix.num_tokens[lo:hi].astype(np.int64)
        blk = Block(a["sample_id"], np.concatenate([[0], np.cumsum(n_tok)]),
                    np.concatenate([[0], np.cumsum(n_tok - 1)]), a["input_ids"].astype(np.int32), a["loss_mask"].astype(bool),
                    ids, vals, tail, np.asarray(a["teacher_nll_sum"], dtype=np.float64), a.get("text"),
                    a["offsets"].astype(np.int32).reshape(-1, 2) if "offsets" in a else None)
        if self.verify:
            bad = check_block(blk, self.manifest.vocab_size, self.manifest.k, self.manifest.target_type != "topk",
                              mass_tol=self.enc.mass_tolerance)
            if bad is not None:
                raise ValueError(f"cache {self.dir}: shard {name} sample_id {blk.sample_ids[bad[0]]!r}: {bad[1]}")
        return blk

    def _block(self, shard: int, block: int) -> Block:
        """One block through the LRU. Concurrent misses of the same block read it once: the
        other threads wait for the first reader (one fetch per block from a remote store)."""
        key = (shard, block)
        while True:
            with self._lock:
                if key in self._lru:
                    self._lru.move_to_end(key)
                    return self._lru[key]
                loading = self._loading.get(key)
                if loading is None:
                    loading = self._loading[key] = threading.Event()
                    break
            loading.wait()  # then look again (the reader failed, or the LRU already evicted it)
        try:
            blk = self.read_block(shard, block)
            with self._lock:
                self._lru[key] = blk
                self._lru_bytes += blk.nbytes
                while self._lru_bytes > self.max_cached_bytes and len(self._lru) > 1:
                    _, old = self._lru.popitem(last=False)
                    self._lru_bytes -= old.nbytes
        finally:
            with self._lock:
                self._loading.pop(key, None)
            loading.set()
        return blk

    def __getitem__(self, i: int) -> CacheRecord:
        s = self.ids.shard_of(i)
        row = int(i) - int(self.shard_starts[s])
        starts = self.index[s].block_starts
        b = int(np.searchsorted(starts, row, side="right") - 1)
        return self._block(s, b).record(row - int(starts[b]))

    def iter_blocks(self) -> Iterator[Block]:
        """Every block in storage order (sequential streaming; no LRU)."""
        for s in range(len(self.shards)):
            for b in range(self.num_blocks(s)):
                yield self.read_block(s, b)

    def __iter__(self) -> Iterator[CacheRecord]:
        for blk in self.iter_blocks():
            for j in range(len(blk.sample_ids)):
                yield blk.record(j)

    def validate(self) -> None:
        """Check every shard's checksum and decode and check every block, whatever ``verify``
        (raises ValueError naming the shard, and the sample ID for an invalid record)."""
        verify, self.verify = self.verify, True
        try:
            for s in range(len(self.shards)):
                self.verify_shard(s)
            for _ in self.iter_blocks():
                pass
        finally:
            self.verify = verify
