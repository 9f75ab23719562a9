"""The per-rank shard writer: buffers records, checks and codes each full shard, and closes it
atomically (temporary name → rename → completion marker; on a remote store, objects under
their final names, then the marker, which is the commit point), in a background thread fed
through a bounded queue.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

import numpy as np

from pipeline.cache.codec import encode_targets
from pipeline.cache.manifest import Manifest, ShardEntry
from pipeline.cache.records import Block, CacheRecord, check_block, record_nbytes
from pipeline.cache.shards import MARKER_SUFFIX, TMP_SUFFIX, ShardBackend, dir_sha256, encoding_of
from pipeline.storage.errors import fault_point, writing
from pipeline.sample_ids import id_hashes
from pipeline.storage import Folder


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
        arrays = {"sample_id": blk.sample_ids, "sample_id_hash": id_hashes(blk.sample_ids), "num_tokens": np.diff(blk.tok_off).astype(np.int32),
                  "teacher_nll_sum": blk.teacher_nll_sum,
                  "input_ids": blk.input_ids.astype(self.enc.index_dtype), "loss_mask": blk.loss_mask,
                  **encode_targets(blk.topk_ids, blk.topk_logprobs, blk.tail_logprob, self.enc)}
        if blk.offsets is not None:  # optional columns: a cache without them is written as before
            arrays["text"], arrays["offsets"] = blk.texts, blk.offsets
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
