"""The teacher cache: prepare (fresh or resumed), write per rank, finalise, open and validate.

Life cycle (stage 1)::

    state = prepare_cache(dir, manifest, overwrite)      # rank 0; broadcast to all ranks
    writer = open_writer(dir, manifest, rank, state.attempt, ...)
    writer.write(records) ... writer.close()             # every rank, own shards only
    finalize_cache(dir)                                  # rank 0, after a barrier

``manifest.json`` says ``complete: true`` only after ``finalize_cache``.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.cache.manifest import MANIFEST, Manifest, read_manifest, write_manifest
from pipeline.cache.parquet import ParquetCacheReader, ParquetCacheWriter, closed_shards, shard_sample_ids
from pipeline.cache.store import CacheReader, CacheRecord, CacheWriter

__all__ = ["CacheReader", "CacheRecord", "CacheWriter", "Manifest", "PrepareState", "prepare_cache", "open_writer",
           "finalize_cache", "open_cache", "read_manifest", "validate_cache"]


@dataclass
class PrepareState:
    """What a (re)run must do: the attempt number for new shard names and the IDs already done."""

    attempt: int
    done_ids: set[str] = field(default_factory=set)


def prepare_cache(cache_dir: str | os.PathLike, manifest: Manifest, overwrite: bool = False) -> PrepareState:
    """Create or resume a cache directory and mark it incomplete (rank 0 only).

    A rerun with the same header (teachers, tokenizer, dataset, k, dtypes...) keeps every
    closed shard and reports their sample IDs as done; temporary and unmarked files are removed.

    Raises:
        ValueError: the directory holds a cache with a different header (the differences are
            named) and ``overwrite`` is false, or it is a non-empty directory that is not a cache.
    """
    d = Path(cache_dir)
    if d.exists() and any(d.iterdir()):
        if not (d / MANIFEST).is_file():
            if not overwrite:
                raise ValueError(f"cache.dir {d} exists, is not empty and is not a teacher cache")
        else:
            old = read_manifest(d)
            diff = old.header_diff(manifest)
            if diff and not overwrite:
                raise ValueError(f"cache {d} was written with different settings ({'; '.join(diff)}); "
                                 "use another cache.dir or cache.overwrite=true")
        if overwrite:
            shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    for stale in list(d.glob("*.tmp")):
        stale.unlink()
    marked = {s.file for s in closed_shards(d)}
    for f in d.glob("part-*.parquet"):
        if f.name not in marked:
            f.unlink()
    done: set[str] = set()
    for s in closed_shards(d):
        done.update(shard_sample_ids(d, s))
    manifest.complete = False
    manifest.shards = closed_shards(d)
    write_manifest(d, manifest)
    return PrepareState(attempt=int(time.time() * 1000) % 10**10, done_ids=done)


def open_writer(cache_dir: str | os.PathLike, manifest: Manifest, rank: int, attempt: int,
                samples_per_shard: int, row_group_size: int) -> CacheWriter:
    """The writer for ``manifest.backend`` (parquet)."""
    if manifest.backend != "parquet":
        raise ValueError(f"cache.backend {manifest.backend!r} is not supported")
    return ParquetCacheWriter(cache_dir, manifest, rank, attempt, samples_per_shard, row_group_size)


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


def open_cache(cache_dir: str | os.PathLike, allow_incomplete: bool = False, verify: bool = True) -> CacheReader:
    """Open a cache for reading.

    Args:
        allow_incomplete: read the closed shards of a cache still being written.
        verify: check shard checksums and run :func:`validate_cache`.
    Raises:
        FileNotFoundError: no such cache / no manifest.
        ValueError: incomplete cache (without ``allow_incomplete``), checksum mismatch or an
            invalid record (the shard and sample ID are named).
    """
    m = read_manifest(cache_dir)
    if not m.complete and not allow_incomplete:
        raise ValueError(f"cache {cache_dir} is incomplete (precompute-teacher has not finished); "
                         "rerun it to resume, or read what is closed with allow_incomplete")
    shards = m.shards if m.complete else closed_shards(cache_dir)
    reader = ParquetCacheReader(cache_dir, m, shards, verify=verify)
    if verify:
        validate_cache(reader)
    return reader


def validate_cache(r: ParquetCacheReader, mass_tol: float = 1e-2) -> None:
    """Vectorised checks of every record; raises ValueError naming shard, sample ID and problem.

    Checks: T-1 positions per T tokens, token and top-k IDs within the vocabulary, top-k
    logprobs finite, <= 0, sorted descending, top-k mass <= 1 + ``mass_tol``, tail log-mass <= 0.
    """
    V = r.manifest.vocab_size

    def fail(pos_index: int, what: str, per_position: bool = True) -> None:
        i = int(np.searchsorted(r.pos_off if per_position else r.tok_off, pos_index, side="right") - 1)
        raise ValueError(f"cache {r.dir}: shard {r.shard_name(i)} sample_id {r.sample_ids[i]!r}: {what}")

    bad = np.nonzero(np.diff(r.pos_off) != np.diff(r.tok_off) - 1)[0]
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"cache {r.dir}: shard {r.shard_name(i)} sample_id {r.sample_ids[i]!r}: "
                         "number of positions is not tokens - 1")
    for name, arr, per_pos in (("input_ids", r.input_ids, False), ("topk_ids", r.topk_ids, True)):
        bad = np.nonzero((arr.reshape(len(arr), -1) >= V).any(-1) | (arr.reshape(len(arr), -1) < 0).any(-1))[0]
        if bad.size:
            fail(int(bad[0]), f"{name} outside the vocabulary [0, {V})", per_pos)
    lp = r.topk_logprobs.astype(np.float32)
    checks = [
        (~np.isfinite(lp).all(-1), "topk_logprobs not finite"),
        ((lp > 0).any(-1), "topk_logprobs > 0"),
        ((np.diff(lp, axis=-1) > 0).any(-1), "topk_logprobs not sorted descending"),
        (np.log(np.exp(lp.astype(np.float64)).sum(-1)) > np.log1p(mass_tol), "top-k probability mass > 1"),
        (np.isnan(r.tail_logprob) | (r.tail_logprob > 0), "tail_logprob NaN or > 0"),
    ]
    for mask, what in checks:
        bad = np.nonzero(mask)[0]
        if bad.size:
            fail(int(bad[0]), what)


def cache_record_from_targets(sample, topk_ids: np.ndarray, topk_logprobs: np.ndarray, tail: np.ndarray,
                              target_logprob: np.ndarray) -> CacheRecord:
    """Build a :class:`CacheRecord` from one sample's unpadded (T-1, ...) teacher outputs."""
    valid = sample.loss_mask[1:]
    return CacheRecord(sample.sample_id, sample.input_ids, sample.loss_mask, topk_ids, topk_logprobs, tail,
                       float(-target_logprob[valid].astype(np.float64).sum()))
