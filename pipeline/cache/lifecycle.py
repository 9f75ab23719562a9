"""The cache's life cycle: prepare a directory (fresh, resumed or overwritten), open a rank's
writer, finalise the manifest, open (and validate) a cache for reading, and its size on disk.
The backend (``parquet`` or ``zarr``) is chosen here by name (:func:`backend_for`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from pipeline.cache.manifest import FORMAT_VERSION, MANIFEST, Manifest, read_manifest, write_manifest
from pipeline.cache.parquet import ParquetBackend
from pipeline.cache.reader import CacheReader
from pipeline.cache.shard_ids import ShardIds, shard_ids_of
from pipeline.cache.shards import MARKER_SUFFIX, ShardBackend, closed_shards, remove_unclosed
from pipeline.cache.writer import CacheWriter
from pipeline.cache.zarr_backend import ZarrBackend
from pipeline.storage import Folder, describe
from pipeline.storage.errors import StoreError, store_error, store_requests

BACKENDS = ("parquet", "zarr")


def backend_for(name: str, compression: str = "zstd", compression_level: int | None = 3) -> ShardBackend:
    """The :class:`ShardBackend` called ``name``. Raises ValueError for an unknown backend."""
    if name == "parquet":
        return ParquetBackend(compression, compression_level)
    if name == "zarr":
        return ZarrBackend(compression, compression_level)
    raise ValueError(f"cache.backend {name!r} is not one of {BACKENDS}")


@dataclass
class PrepareState:
    """What a (re)run must do: the attempt number for new shard names and the samples already
    done (the closed shards' IDs as hashes, :class:`~pipeline.cache.shard_ids.ShardIds`:
    ``done.find(ids) >= 0`` marks the done ones; about 12 bytes per done sample)."""

    attempt: int
    done: ShardIds


def prepare_cache(cache_dir: str | os.PathLike, manifest: Manifest, overwrite: bool = False) -> PrepareState:
    """Create or resume a cache directory and mark it incomplete (rank 0 only).

    A rerun with the same header (teachers, tokenizer, dataset, k, dtypes...) keeps every
    closed shard and reports their samples as done (as ID hashes read from the shards); temporary and unmarked shards are removed.

    Raises:
        ValueError: the directory holds a cache with a different header (the differences are
            named) and ``overwrite`` is false, or it is a non-empty directory that is not a cache,
            or the path is an existing file (even with ``overwrite``: a file is never removed).
        StoreError: on a remote store: the endpoint is unreachable, the store refuses the
            credentials, the bucket does not exist, or it throttles; ``cache.dir``, the URL and
            the cause named (:func:`~pipeline.storage.check_access`).
    """
    folder = Folder(cache_dir)
    try:
        return _prepare(folder, manifest, overwrite)
    except StoreError:
        raise
    except Exception as e:  # a store request outside Folder (refused credentials, unreachable endpoint...)
        err = store_error(e, folder.url, key="cache.dir") if folder.is_remote else None
        if err is not None:
            raise err from None
        if not folder.is_remote or not isinstance(e, OSError):
            raise
        raise ValueError(f"cache.dir {folder.url}: the store refused or failed the request ({describe(e)})") from None


def _prepare(folder: Folder, manifest: Manifest, overwrite: bool) -> PrepareState:
    """:func:`prepare_cache` for a local directory or a prefix on a remote store: the same
    rules, over files or objects."""
    d = folder.path
    folder.check_access("cache.dir")
    file, directory = folder.nouns
    if folder.isfile("") if folder.is_remote else (d.exists() and not d.is_dir()):
        raise ValueError(f"cache.dir {d} is an existing {file}, not a {directory}; use another cache.dir "
                         "(nothing was changed)")
    names = folder.list()
    if names:
        if MANIFEST not in names:
            if not overwrite:
                raise ValueError(f"cache.dir {d} exists, is not empty and is not a teacher cache; "
                                 "use another cache.dir (nothing was changed)")
        else:
            diff = read_manifest(d).header_diff(manifest)
            if diff and not overwrite:
                raise ValueError(f"cache {d} was written with different settings ({'; '.join(diff)}); "
                                 "use another cache.dir or cache.overwrite=true")
        if overwrite:
            folder.rmtree()
    folder.makedirs()
    remove_unclosed(d)
    backend = backend_for(manifest.backend, manifest.compression)
    shards = closed_shards(d)
    done = shard_ids_of(folder.url, backend, manifest.backend, manifest.compression, shards)
    manifest.complete = False
    manifest.shards = shards
    write_manifest(d, manifest)
    return PrepareState(attempt=int(time.time() * 1000) % 10**10, done=done)


def open_writer(cache_dir: str | os.PathLike, manifest: Manifest, rank: int, attempt: int,
                samples_per_shard: int, row_group_size: int, compression_level: int | None = 3,
                queue_shards: int = 2, shard_bytes: int | None = None) -> CacheWriter:
    """This rank's :class:`CacheWriter` for ``manifest.backend``; ``row_group_size`` samples
    per block (parquet row group / zarr block); shards are closed by a background thread fed
    through a queue of at most ``queue_shards`` shards (0: in the calling thread); a shard is
    closed at ``samples_per_shard`` samples or ``shard_bytes`` bytes of records, whichever first.

    Raises:
        ValueError: unknown backend, ``queue_shards < 0``.
    """
    backend = backend_for(manifest.backend, manifest.compression, compression_level)
    return CacheWriter(backend, cache_dir, manifest, rank, attempt, samples_per_shard, row_group_size,
                       queue_shards=queue_shards, shard_bytes=shard_bytes)


def finalize_cache(cache_dir: str | os.PathLike, skipped_empty: int = 0) -> Manifest:
    """Sum the closed shards into the manifest and mark it complete (rank 0, after all ranks closed)."""
    m = read_manifest(cache_dir)
    m.shards = closed_shards(cache_dir)
    m.num_samples = sum(s.num_samples for s in m.shards)
    m.num_tokens = sum(s.num_tokens for s in m.shards)
    m.num_valid_positions = sum(s.num_valid_positions for s in m.shards)
    m.teacher_nll_sum = sum(s.teacher_nll_sum for s in m.shards)
    m.skipped_empty = skipped_empty
    m.complete = True
    write_manifest(cache_dir, m)
    return m


def open_cache(cache_dir: str | os.PathLike, allow_incomplete: bool = False, verify: bool = True,
               max_cached_bytes: int = 2 << 30) -> CacheReader:
    """Open a cache for reading; the backend comes from the manifest.

    Args:
        allow_incomplete: read the closed shards of a cache still being written.
        verify: check row counts now (from the shard indexes), each shard's checksum on the
            first read of one of its blocks, and every record as its block is decoded
            (:func:`pipeline.cache.records.check_block`). Opening reads no shard's bytes beyond
            its index.
        max_cached_bytes: bound of the reader's LRU of decoded blocks.
    Raises:
        FileNotFoundError: no such cache / no manifest / a listed shard is missing.
        ValueError: the path is a file, incomplete cache (without ``allow_incomplete``), an invalid manifest, a
            format version this code does not read, a row-count mismatch, an unreadable shard
            index, a shard on disk without a listing, duplicate sample IDs (shard and sample ID
            named); a checksum mismatch is raised by the first read of that shard
            (:class:`~pipeline.cache.reader.CacheReader`).
        StoreError: (store) a request failed: unreachable endpoint, refused credentials, missing
            bucket, throttling (:func:`~pipeline.storage.errors.store_cause`; the URL named).
    """
    local = Folder(cache_dir).dir  # None on a store
    if local is not None and local.exists() and not local.is_dir():
        raise ValueError(f"cache {cache_dir} is a file, not a teacher cache directory")
    with store_requests(cache_dir):  # a shard index read by a backend: the cache and the cause named
        return _open(cache_dir, allow_incomplete, verify, max_cached_bytes)


def _open(cache_dir: str | os.PathLike, allow_incomplete: bool, verify: bool, max_cached_bytes: int) -> CacheReader:
    """:func:`open_cache` once the path is known not to be a local file."""
    m = read_manifest(cache_dir)
    if m.format_version != FORMAT_VERSION:
        raise ValueError(f"cache {cache_dir} has format_version {m.format_version}; this version reads "
                         f"{FORMAT_VERSION}: rerun precompute-teacher into a new cache.dir")
    if not m.complete and not allow_incomplete:
        raise ValueError(f"cache {cache_dir} is incomplete (precompute-teacher has not finished); "
                         "rerun it to resume, or read what is closed with allow_incomplete")
    shards = m.shards if m.complete else closed_shards(cache_dir)
    if m.complete and verify:
        on_disk = {n[:-len(MARKER_SUFFIX)] for n in Folder(cache_dir).list()  # marker names: no marker read
                   if n.endswith(MARKER_SUFFIX) and not n.startswith(".")}
        listed = {s.file for s in m.shards}
        if on_disk != listed:
            extra, missing = sorted(on_disk - listed), sorted(listed - on_disk)
            raise ValueError(f"cache {cache_dir}: manifest and closed shards disagree "
                             f"(not listed: {extra[:3]}, marker missing: {missing[:3]})")
    return CacheReader(backend_for(m.backend, m.compression), cache_dir, m, shards, verify=verify,
                       max_cached_bytes=max_cached_bytes)


def validate_cache(cache_dir: str | os.PathLike, allow_incomplete: bool = False) -> CacheReader:
    """Open, check every shard's checksum and decode-and-check every record (raises ValueError
    naming the shard, and the sample ID, of the first problem); returns the reader."""
    r = open_cache(cache_dir, allow_incomplete=allow_incomplete, verify=True)
    r.validate()
    return r


def cache_bytes(cache_dir: str | os.PathLike) -> int:
    """Bytes on disk (or in the store) of the closed shards of a cache (manifest and markers excluded)."""
    folder = Folder(cache_dir)
    return sum(sum(folder.files(s.file).values()) for s in closed_shards(cache_dir))
