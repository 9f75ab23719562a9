"""The cache's record, the backend interface, and the backend-independent writer and reader.

A backend (parquet, zarr) only moves *coded shards* between memory and disk
(:class:`ShardBackend`). Everything else lives here once for all backends: buffering,
atomic shard closing (temporary name → rename → completion marker; on a remote store, objects
under their final names, then the marker, which is the commit point), coding
(:mod:`pipeline.cache.codec`), validation, the sample-ID index, a byte-bounded LRU of
decoded blocks for random access, and sequential streaming.
"""
from __future__ import annotations

import functools
import hashlib
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from pipeline.cache.codec import Encoding, decode_targets, encode_targets
from pipeline.cache.manifest import Manifest, ShardEntry
from pipeline.storage.errors import fault_point, writing
from pipeline.storage import Folder, RemotePath

MARKER_SUFFIX = ".done.json"
TMP_SUFFIX = ".tmp"


@dataclass
class CacheRecord:
    """Teacher targets of one sample (T tokens, T-1 positions).

    Attributes:
        sample_id: unique string ID.
        input_ids: (T,) int32 tokens.
        loss_mask: (T,) bool; position t is valid iff ``loss_mask[t+1]``.
        topk_ids: (T-1, k) int32 token IDs, descending probability; padding slots id 0.
        topk_logprobs: (T-1, k) float32 teacher log-probabilities (or, for sampled targets, log
            of the estimated probability), sorted descending; padding slots ``-inf``.
        tail_logprob: (T-1,) float32 log of the teacher mass outside the stored ids.
        teacher_nll_sum: teacher's summed negative log-likelihood of the actual next tokens
            over the valid positions (nats).
    """

    sample_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logprob: np.ndarray
    teacher_nll_sum: float

    @property
    def n_valid(self) -> int:
        """Valid target positions of the sample (``loss_mask[1:]`` set)."""
        return int(self.loss_mask[1:].sum())


@dataclass
class Block:
    """Decoded targets of consecutive samples (flat token-major arrays plus offsets).

    Attributes:
        sample_ids: n IDs. tok_off / pos_off: (n+1,) int64 offsets into the token arrays
        (``input_ids``, ``loss_mask``) and the position arrays (``topk_ids`` (P, k),
        ``topk_logprobs`` (P, k), ``tail_logprob`` (P,)). teacher_nll_sum: (n,) float64.
    """

    sample_ids: list[str]
    tok_off: np.ndarray
    pos_off: np.ndarray
    input_ids: np.ndarray
    loss_mask: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logprob: np.ndarray
    teacher_nll_sum: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes of the block's arrays (tokens, mask, targets)."""
        return sum(a.nbytes for a in (self.input_ids, self.loss_mask, self.topk_ids, self.topk_logprobs, self.tail_logprob))

    def record(self, j: int) -> CacheRecord:
        """The ``j``-th sample of the block (views, no copy)."""
        a, b = self.tok_off[j], self.tok_off[j + 1]
        p, q = self.pos_off[j], self.pos_off[j + 1]
        return CacheRecord(self.sample_ids[j], self.input_ids[a:b], self.loss_mask[a:b], self.topk_ids[p:q],
                           self.topk_logprobs[p:q], self.tail_logprob[p:q], float(self.teacher_nll_sum[j]))

    @staticmethod
    def from_records(records: list[CacheRecord]) -> "Block":
        """Concatenate ``records`` into one block (offsets per sample)."""
        n_tok = np.array([len(r.input_ids) for r in records], dtype=np.int64)
        cat = np.concatenate
        return Block([r.sample_id for r in records], np.concatenate([[0], np.cumsum(n_tok)]),
                     np.concatenate([[0], np.cumsum(n_tok - 1)]), cat([r.input_ids for r in records]),
                     cat([r.loss_mask for r in records]).astype(bool), cat([r.topk_ids for r in records]),
                     cat([r.topk_logprobs for r in records]), cat([r.tail_logprob for r in records]),
                     np.array([r.teacher_nll_sum for r in records], dtype=np.float64))


def check_block(b: Block, vocab_size: int, k: int, allow_padding: bool, mass_tol: float = 1e-2,
                value_tol: float = 1e-4) -> tuple[int, str] | None:
    """Vectorised record checks; returns (sample index in the block, problem) for the first bad
    sample, or None.

    Checks: T-1 positions per T tokens, (P, k) target shapes, token and target ids within
    ``[0, vocab_size)``, values not NaN, finite except trailing ``-inf`` padding (only when
    ``allow_padding``), ``<= value_tol``, sorted descending, probability mass ``<= 1 + mass_tol``,
    tail log-mass not NaN and ``<= value_tol``.
    """
    if len(b.input_ids) != b.tok_off[-1] or len(b.loss_mask) != b.tok_off[-1]:
        return 0, f"{len(b.input_ids)} tokens stored, lengths say {int(b.tok_off[-1])}"
    if np.any(np.diff(b.tok_off) < 2):
        return int(np.argmax(np.diff(b.tok_off) < 2)), "fewer than 2 tokens"
    if b.topk_ids.shape != (b.pos_off[-1], k) or b.topk_logprobs.shape != (b.pos_off[-1], k) \
            or b.tail_logprob.shape != (b.pos_off[-1],):
        return 0, (f"targets of shape {b.topk_logprobs.shape} do not match {int(b.pos_off[-1])} positions "
                   f"(tokens - 1 per sample) × k={k}")
    def owner(offsets: np.ndarray, index: int) -> int:
        return int(np.searchsorted(offsets, index, side="right") - 1)

    bad = (b.input_ids < 0) | (b.input_ids >= vocab_size)
    if bad.any():
        return owner(b.tok_off, int(np.argmax(bad))), f"input_ids outside the vocabulary [0, {vocab_size})"
    v = b.topk_logprobs.astype(np.float32, copy=False)
    ids = b.topk_ids
    pad = np.isneginf(v)
    with np.errstate(invalid="ignore", over="ignore"):
        steps = np.diff(v, axis=1)  # -inf after -inf is NaN: not > 0
        lse = np.log(np.exp(v).sum(1, dtype=np.float64))
    checks = [
        ((((ids < 0) | (ids >= vocab_size)) & ~pad).any(1), f"topk_ids outside the vocabulary [0, {vocab_size})"),
        ((np.isnan(v) | np.isposinf(v)).any(1), "topk_logprobs not finite (NaN or +inf)"),
        (pad.any(1) if not allow_padding else pad.all(1), "topk_logprobs -inf" if not allow_padding
         else "every slot is padding (-inf)"),
        ((v > value_tol).any(1), f"topk_logprobs > 0 (tolerance {value_tol})"),
        ((steps > 0).any(1), "topk_logprobs not sorted descending (or padding before a real slot)"),
        (lse > np.log1p(mass_tol), f"probability mass of the stored slots > 1 + {mass_tol}"),
        (np.isnan(b.tail_logprob) | (b.tail_logprob > value_tol), "tail_logprob NaN or > 0"),
    ]
    for mask, what in checks:
        if mask.any():
            return owner(b.pos_off, int(np.argmax(mask))), what
    return None


def dir_sha256(path: Path | RemotePath) -> str:
    """SHA-256 of a shard: the file's bytes, or for a directory (zarr group) every file's
    relative path and bytes in sorted order (path order of :class:`~pathlib.Path`). A remote
    shard is read whole (one GET per object)."""
    h = hashlib.sha256()
    if isinstance(path, RemotePath):
        files = path.remote.files(path.name)
        for rel in sorted(files, key=lambda r: r.split("/")):
            if rel:
                h.update(rel.encode() + b"\0")
            h.update(path.remote.fs.cat_file(path.remote.path(f"{path.name}/{rel}" if rel else path.name)))
        return h.hexdigest()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class ShardIndex:
    """What a reader needs from a shard without decoding its targets.

    Attributes:
        sample_ids: n IDs in storage order. num_tokens: (n,) int64. teacher_nll_sum: (n,)
        float64. block_starts: (B+1,) int64 sample offsets of the shard's blocks.
    """

    sample_ids: list[str]
    num_tokens: np.ndarray
    teacher_nll_sum: np.ndarray
    block_starts: np.ndarray

    @functools.cached_property
    def token_offsets(self) -> np.ndarray:
        """(n+1,) int64 offset of each sample's first token in the shard's token arrays."""
        return np.concatenate([[0], np.cumsum(self.num_tokens)]).astype(np.int64)


class ShardBackend(Protocol):
    """Moves one coded shard between memory and disk (parquet file or zarr group).

    ``arrays`` hold ``sample_id`` (list of n str), ``num_tokens`` (n,) int32,
    ``teacher_nll_sum`` (n,) float64, ``input_ids`` (T_total,), ``loss_mask`` (T_total,) bool
    and the coded target arrays of :func:`pipeline.cache.codec.encode_targets` over
    ``P_total = T_total - n`` positions.
    """

    suffix: str

    def write_shard(self, path: Path, arrays: dict, k: int, block_size: int) -> None:
        """Write a shard at ``path`` (a path not yet existing; the caller renames it)."""
        ...

    def read_index(self, path: Path) -> ShardIndex:
        """The shard's index (sample IDs, lengths, block starts) without its targets."""
        ...

    def read_block(self, path: Path, index: ShardIndex, block: int) -> dict:
        """The ``arrays`` of the samples ``index.block_starts[block]:[block+1]``."""
        ...


def encoding_of(m: Manifest) -> Encoding:
    """The target encoding (index/value dtypes, index coding, q8 step) recorded in ``m``."""
    return Encoding(m.index_dtype, m.value_dtype, m.index_coding, m.q8_step)


def record_nbytes(r: CacheRecord) -> int:
    """Bytes of a record's arrays in memory (input_ids, loss_mask, top-k ids and log-probs, tail)."""
    return sum(a.nbytes for a in (r.input_ids, r.loss_mask, r.topk_ids, r.topk_logprobs, r.tail_logprob))


class CacheWriter:
    """Per-rank writer: buffers records and closes shards atomically (temporary name →
    rename → completion marker ``<name>.done.json`` holding the :class:`ShardEntry`).

    Shards are ``part-r{rank}-a{attempt}-{n}{suffix}``; no two writers ever share a shard
    (PLATFORM.md: concurrent writers inside one zarr shard lost data).

    With ``queue_shards > 0`` (default 2) every full shard's records go to one background
    thread per writer through a queue of at most ``queue_shards`` shards, so the caller (the
    teacher loop) only buffers records: the thread does the checks, coding, compression,
    SHA-256, write, rename and marker, in shard order, with the same names and bytes as
    ``queue_shards=0``, which does all of it in the calling thread. A full queue blocks
    :meth:`write` (backpressure; memory: about ``queue_shards + 2`` shards of records — the
    open one, the queued ones, the one being written; ``shard_bytes`` bounds a shard's record
    bytes, :func:`record_nbytes`, whatever the samples' lengths and k). An error of the thread is raised by
    the next :meth:`write` or by :meth:`close`, unchanged (a :class:`~pipeline.storage.errors.StorageError`
    stays one); the shards after the failed one are dropped, not written. Records must not be
    modified after :meth:`write`. :meth:`close` (or :meth:`abort`) must be called: it waits
    for the thread.

    Attributes:
        closed: the :class:`ShardEntry` of every shard closed so far, in order (complete after
            :meth:`close`). wait_seconds: seconds the caller spent blocked on the thread (full
            queue, and the wait in :meth:`close`).
    Raises:
        ValueError: a record fails :func:`check_block` (NaN teacher output...); the record's
            sample ID is named and its shard is not written.
        StorageError: an I/O error writing a shard or its marker (shard and cache named); the
            shard's files are removed and it is not marked closed.
    """

    def __init__(self, backend: ShardBackend, cache_dir: str | os.PathLike, manifest: Manifest, rank: int,
                 attempt: int, samples_per_shard: int, block_size: int, queue_shards: int = 2,
                 shard_bytes: int | None = None):
        if queue_shards < 0:
            raise ValueError(f"cache writer: queue_shards={queue_shards} must be >= 0")
        self.backend, self.m = backend, manifest
        self.folder = Folder(cache_dir)
        self.dir = self.folder.path  # named in messages
        self.enc = encoding_of(manifest)
        self.rank, self.attempt = rank, attempt
        self.samples_per_shard, self.block_size = samples_per_shard, block_size
        self.shard_bytes = shard_bytes
        self._buffer_bytes = 0
        self.queue_shards = queue_shards
        self.buffer: list[CacheRecord] = []
        self.closed: list[ShardEntry] = []
        self.wait_seconds = 0.0
        self._queue: queue.Queue[list[CacheRecord] | None] = queue.Queue(maxsize=max(queue_shards, 1))
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None  # set by the thread, raised by the caller
        self._discard = False  # abort: the thread drops the queued shards

    def write(self, records: list[CacheRecord]) -> None:
        """Buffer ``records`` and hand every full shard (``samples_per_shard`` records, or fewer
        once their arrays hold ``shard_bytes``) to the writer (blocks while ``queue_shards``
        shards are pending).

        Raises:
            ValueError, StorageError: an earlier shard failed in the writer thread (or, with
                ``queue_shards=0``, this call's shard failed); nothing more is written.
        """
        self._raise_failure()
        for r in records:
            self.buffer.append(r)
            self._buffer_bytes += record_nbytes(r)
            if len(self.buffer) >= self.samples_per_shard or (
                    self.shard_bytes is not None and self._buffer_bytes >= self.shard_bytes):
                shard, self.buffer, self._buffer_bytes = self.buffer, [], 0
                self._submit(shard)
        self._raise_failure()

    def close(self) -> list[ShardEntry]:
        """Flush the open shard and wait until the writer thread has closed every shard;
        returns the shards this writer closed.

        Raises:
            ValueError, StorageError: a shard failed (the first failure, as raised by the
                writer); the shards after it are not written.
        """
        self._raise_failure()
        if self.buffer:
            shard, self.buffer, self._buffer_bytes = self.buffer, [], 0
            self._submit(shard)
        t = time.perf_counter()
        self._stop()
        self.wait_seconds += time.perf_counter() - t
        self._raise_failure()
        return self.closed

    def abort(self) -> None:
        """Stop after the shard being written (if any): the open and queued shards are dropped,
        nothing is raised. For a caller that is failing for another reason."""
        self.buffer = []
        self._stop(discard=True)

    def _submit(self, records: list[CacheRecord]) -> None:
        """Close one shard of ``records``: now (``queue_shards=0``) or via the writer thread."""
        if self.queue_shards == 0:
            self._flush(records)
            return
        if self._thread is None:
            self._discard = False
            self._thread = threading.Thread(target=self._run, name=f"cache-writer-r{self.rank}", daemon=True)
            self._thread.start()
        t = time.perf_counter()
        self._queue.put(records)
        self.wait_seconds += time.perf_counter() - t

    def _run(self) -> None:
        """The writer thread: close the queued shards in order until the ``None`` sentinel;
        after a failure (or an abort) keep draining the queue without writing, so the caller
        never blocks on a dead writer."""
        while True:
            records = self._queue.get()
            if records is None:
                return
            if self._failure is not None or self._discard:
                continue
            try:
                self._flush(records)
            except BaseException as e:  # noqa: BLE001 — raised again in the caller's thread
                self._failure = e

    def _stop(self, discard: bool = False) -> None:
        """Send the sentinel and join the writer thread (no-op without one)."""
        if self._thread is None:
            return
        self._discard = self._discard or discard
        self._queue.put(None)
        self._thread.join()
        self._thread = None

    def _raise_failure(self) -> None:
        """Raise the writer thread's error, if any, after stopping the thread."""
        if self._failure is not None:
            self._stop(discard=True)
            raise self._failure

    def _flush(self, records: list[CacheRecord]) -> None:
        blk = Block.from_records(records)
        bad = check_block(blk, self.m.vocab_size, self.m.k, allow_padding=self.m.target_type != "topk")
        if bad is not None:
            raise ValueError(f"teacher output for sample_id {blk.sample_ids[bad[0]]!r}: {bad[1]}; "
                             f"nothing written for its shard (cache {self.dir})")
        arrays = {"sample_id": blk.sample_ids, "num_tokens": np.diff(blk.tok_off).astype(np.int32),
                  "teacher_nll_sum": blk.teacher_nll_sum,
                  "input_ids": blk.input_ids.astype(self.enc.index_dtype), "loss_mask": blk.loss_mask,
                  **encode_targets(blk.topk_ids, blk.topk_logprobs, blk.tail_logprob, self.enc)}
        name = f"part-r{self.rank:05d}-a{self.attempt}-{len(self.closed):05d}{self.backend.suffix}"
        marker = name + MARKER_SUFFIX
        marker_tmp = Path(marker).with_suffix(TMP_SUFFIX).name
        # locally the shard is written under NAME.tmp and renamed; on a store (no rename) it is
        # coded into a local staging directory and uploaded under its final name. Either way
        # the marker is written last: the commit point. A failed write removes the shard's
        # local files (space back) and leaves no marker: the rerun writes this shard again and
        # keeps every shard closed before it; a shard killed during its upload has objects but
        # no marker: readers ignore it and the rerun deletes it (:func:`remove_unclosed`)
        with self.folder.staged_file(name, TMP_SUFFIX) as tmp:
            with writing(f"shard {name} of the cache", self.dir,
                         *self.folder.local_paths(name + TMP_SUFFIX, name, marker_tmp)):
                self.backend.write_shard(tmp, arrays, self.m.k, self.block_size)
                entry = ShardEntry(file=name, rank=self.rank, num_samples=len(records), num_tokens=int(blk.tok_off[-1]),
                                   num_valid_positions=int(sum(r.n_valid for r in records)),
                                   teacher_nll_sum=float(blk.teacher_nll_sum.sum()), sha256=dir_sha256(tmp))
                self._fault("before_rename")
                self.folder.publish(tmp, name, after_object=lambda i: i == 1 and self._fault("mid_upload"))
                self._fault("before_marker")
                self.folder.write_bytes(marker, entry.model_dump_json().encode(), tmp_name=marker_tmp)
        self._fault("after_marker")
        self.closed.append(entry)

    def _fault(self, point: str) -> None:
        """Crash-test kill points (:func:`pipeline.storage.errors.fault_point`): ``POINT`` is
        before_rename | mid_upload (a store: after the shard's first object) | before_marker |
        after_marker, ``N`` the index of the shard being closed."""
        fault_point(point, len(self.closed), self.rank)


def closed_shards(cache_dir: str | os.PathLike) -> list[ShardEntry]:
    """Shards with a completion marker, in file-name order (unmarked shards are ignored)."""
    folder = Folder(cache_dir)
    return [ShardEntry.model_validate_json(folder.read_bytes(n)) for n in folder.list()
            if n.endswith(MARKER_SUFFIX) and not n.startswith(".")]


def remove_unclosed(cache_dir: str | os.PathLike) -> list[str]:
    """Delete temporary files/directories and shards without a completion marker; returns their names."""
    folder = Folder(cache_dir)
    marked = {s.file for s in closed_shards(cache_dir)}
    names = [n for n in folder.list() if not n.startswith(".")]
    gone: list[str] = []
    for n in [n for n in names if n.endswith(TMP_SUFFIX)] + [n for n in names if n.startswith("part-")
                                                             and not n.endswith(MARKER_SUFFIX)]:
        if n in marked or n in gone:
            continue
        folder.rmtree(n) if folder.isdir(n) and not folder.is_remote else folder.remove(n)
        gone.append(n)
    return gone


class CacheReader:
    """Random access by index or sample ID, and sequential streaming, over closed shards.

    Opening reads only the shard list (manifest / markers, passed in) and each shard's index
    (sample IDs, lengths, block starts): its I/O does not grow with the cache's bytes, so every
    rank of every start and resume opens at the cost of the indexes. Targets are decoded one
    block (a parquet row group / a run of zarr rows) at a time and kept in an LRU bounded by
    ``max_cached_bytes`` of decoded arrays, so random access costs one block decode per
    miss and a cache that fits is decoded once.

    With ``verify`` (the default) a shard's SHA-256 (:func:`dir_sha256`, over all its bytes) is
    checked against its marker lazily: the first time any block of that shard is read, once
    per shard per reader (concurrent first reads of one shard hash it once; a mismatch is
    remembered and raised on every later read of the shard). A shard whose index cannot be
    read at open is hashed then, so a truncated or overwritten file is reported as a checksum
    mismatch rather than as unreadable. Each decoded block is also validated
    (:func:`check_block`). :meth:`validate` checks every shard's checksum and every block.
    Thread-safe.

    Raises:
        FileNotFoundError: (open) a listed shard is missing.
        ValueError: (open) a shard's index is unreadable, its row count differs from its
            marker, duplicate sample IDs, sample count differs from a complete manifest;
            (first read of a shard, ``verify``) its checksum differs from its marker
            ("checksum mismatch", cache dir and shard file named); (read) a block is
            unreadable or holds an invalid record (shard and sample ID named).
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
            path = self.shard_path(s.file)
            if s.file not in present:
                raise FileNotFoundError(f"cache {self.dir}: shard {s.file} listed but missing")
            try:
                ix = backend.read_index(path)
            except Exception as e:  # noqa: BLE001 — any decoder error means an unreadable shard
                if verify:  # a changed file is named as such (the hash is paid only on this failure)
                    self._check_sha256(s)
                raise ValueError(f"cache {self.dir}: shard {s.file} unreadable ({type(e).__name__}: {e})") from None
            if len(ix.sample_ids) != s.num_samples or int(ix.num_tokens.sum()) != s.num_tokens:
                raise ValueError(f"cache {self.dir}: shard {s.file} holds {len(ix.sample_ids)} samples / "
                                 f"{int(ix.num_tokens.sum())} tokens, its marker says {s.num_samples} / {s.num_tokens}")
            self.index.append(ix)
        self.sample_ids: list[str] = [sid for ix in self.index for sid in ix.sample_ids]
        self._lengths = np.concatenate([ix.num_tokens for ix in self.index]).astype(np.int64)
        self.teacher_nll_sum = np.concatenate([ix.teacher_nll_sum for ix in self.index])
        self.shard_of = np.repeat(np.arange(len(shards)), [len(ix.sample_ids) for ix in self.index])
        self.row_in_shard = np.concatenate([np.arange(len(ix.sample_ids)) for ix in self.index])
        self._sample_index = {sid: i for i, sid in enumerate(self.sample_ids)}
        if len(self._sample_index) != len(self.sample_ids):
            seen: dict[str, int] = {}
            for i, sid in enumerate(self.sample_ids):
                if sid in seen:
                    raise ValueError(f"cache {self.dir}: duplicate sample_id {sid!r} in shards "
                                     f"{self.shard_name(seen[sid])} and {self.shard_name(i)}")
                seen[sid] = i
        if manifest.complete and len(self.sample_ids) != manifest.num_samples:
            raise ValueError(f"cache {self.dir}: manifest says {manifest.num_samples} samples, shards hold {len(self.sample_ids)}")
        self._lru: OrderedDict[tuple[int, int], Block] = OrderedDict()
        self._lru_bytes = 0
        self._lock = threading.Lock()
        self._loading: dict[tuple[int, int], threading.Event] = {}  # blocks being read now
        # lazy checksums: None = not checked yet, "" = matches, else the mismatch message
        self._sha_state: list[str | None] = [None] * len(shards)
        self._sha_locks = [threading.Lock() for _ in shards]  # one per shard: others are read meanwhile

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
        return len(self.sample_ids)

    def index_of(self, sample_id: str) -> int:
        """Position of ``sample_id``. Raises KeyError naming the cache and ID."""
        try:
            return self._sample_index[sample_id]
        except KeyError:
            raise KeyError(f"cache {self.dir}: no sample_id {sample_id!r}") from None

    def lengths(self) -> np.ndarray:
        """(N,) int64 token count of every sample."""
        return self._lengths

    def shard_name(self, i: int) -> str:
        """The file name of the shard holding sample ``i``."""
        return self.shards[self.shard_of[i]].file

    def block_ids(self) -> np.ndarray:
        """(N,) int64 global block number of every sample (the unit the LRU caches)."""
        out, base = [], 0
        for s, ix in enumerate(self.index):
            n = len(ix.sample_ids)
            out.append(base + np.searchsorted(ix.block_starts, np.arange(n), side="right") - 1)
            base += self.num_blocks(s)
        return np.concatenate(out).astype(np.int64)

    # ------------------------------------------------------------------ blocks
    def num_blocks(self, shard: int) -> int:
        """Number of blocks (row groups / zarr row runs) of shard ``shard``."""
        return len(self.index[shard].block_starts) - 1

    def read_block(self, shard: int, block: int) -> Block:
        """Decode (and validate) one block, bypassing the LRU. With ``verify`` the shard's
        checksum is checked first, on the first read of the shard (:meth:`verify_shard`).

        Raises:
            ValueError: checksum mismatch, unreadable block, invalid record (shard named).
        """
        ix, name = self.index[shard], self.shards[shard].file
        if self.verify_checksums:
            self.verify_shard(shard)
        try:
            a = self.backend.read_block(self.shard_path(name), ix, block)
            ids, vals, tail = decode_targets(a, self.enc)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cache {self.dir}: shard {name} block {block} unreadable ({type(e).__name__}: {e})") from None
        lo, hi = ix.block_starts[block], ix.block_starts[block + 1]
        n_tok = ix.num_tokens[lo:hi].astype(np.int64)
        blk = Block(ix.sample_ids[lo:hi], np.concatenate([[0], np.cumsum(n_tok)]),
                    np.concatenate([[0], np.cumsum(n_tok - 1)]), a["input_ids"].astype(np.int32), a["loss_mask"].astype(bool),
                    ids, vals, tail, ix.teacher_nll_sum[lo:hi])
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
        s, row = int(self.shard_of[i]), int(self.row_in_shard[i])
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
