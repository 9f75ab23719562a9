"""The teacher cache: prepare (fresh or resumed), write per rank, finalise, open and validate.

Life cycle (stage 1)::

    state = on_rank0(prepare_cache, dir, manifest, overwrite)  # rank 0 runs it, every rank gets the result
    writer = open_writer(dir, manifest, rank, state.attempt, ...)
    writer.write(records) ... writer.close()             # every rank, own shards only; a background
                                                         # thread closes the shards, close() joins it
    finalize_cache(dir)                                  # rank 0, after a barrier

``manifest.json`` says ``complete: true`` only after ``finalize_cache``. Two backends
(``parquet``, ``zarr``) implement :class:`~pipeline.cache.shards.ShardBackend`: a backend only
moves *coded shards* between memory and disk. Everything else exists once for all backends:
buffering, atomic shard closing, coding, validation, the sample-ID index, a byte-bounded LRU of
decoded blocks for random access, and sequential streaming.

Layout (this module only re-exports):

- :mod:`pipeline.cache.lifecycle`: :func:`prepare_cache`, :func:`open_writer`,
  :func:`finalize_cache`, :func:`open_cache`, :func:`validate_cache`, :func:`cache_bytes`.
- :mod:`pipeline.cache.records`: :class:`CacheRecord`, :class:`Block` and the validation of
  their targets (:func:`check_block`).
- :mod:`pipeline.cache.shards`: the backend interface, the shard checksum, completion markers.
- :mod:`pipeline.cache.shard_ids`: :class:`ShardIds`, the closed shards' sample IDs as sorted
  64-bit hashes (resume, ``index_of``, the duplicate check), confirmed against the shards' IDs.
- :mod:`pipeline.cache.writer`: :class:`CacheWriter`. :mod:`pipeline.cache.reader`:
  :class:`CacheReader`.
- :mod:`pipeline.cache.manifest`, :mod:`pipeline.cache.codec`, :mod:`pipeline.cache.parquet`,
  :mod:`pipeline.cache.zarr_backend`, :mod:`pipeline.cache.stats` (inspect-cache).
"""
from __future__ import annotations

from pipeline.cache.codec import Encoding
from pipeline.cache.lifecycle import (BACKENDS, PrepareState, backend_for, cache_bytes, finalize_cache, open_cache,
                                      open_writer, prepare_cache, validate_cache)
from pipeline.cache.manifest import FORMAT_VERSION, MANIFEST, Manifest, read_manifest, write_manifest
from pipeline.cache.parquet import ParquetBackend
from pipeline.cache.reader import CacheReader
from pipeline.cache.records import Block, CacheRecord, cache_record_from_targets, check_block, record_nbytes
from pipeline.cache.shard_ids import ShardIds
from pipeline.cache.shards import (MARKER_SUFFIX, TMP_SUFFIX, ShardBackend, ShardIndex, closed_shards, dir_sha256,
                                   encoding_of, remove_unclosed)
from pipeline.cache.writer import CacheWriter
from pipeline.cache.zarr_backend import ZarrBackend

__all__ = ["BACKENDS", "Block", "CacheReader", "CacheRecord", "CacheWriter", "Encoding", "FORMAT_VERSION", "MANIFEST",
           "MARKER_SUFFIX", "Manifest", "ParquetBackend", "PrepareState", "ShardBackend", "ShardIds", "ShardIndex", "TMP_SUFFIX",
           "ZarrBackend", "backend_for", "cache_bytes", "cache_record_from_targets", "check_block", "closed_shards",
           "dir_sha256", "encoding_of", "finalize_cache", "open_cache", "open_writer", "prepare_cache",
           "read_manifest", "record_nbytes", "remove_unclosed", "validate_cache", "write_manifest"]
