"""Shards on disk, shared by the writer, the reader and the backends: the backend interface
(:class:`ShardBackend`, which only moves *coded shards* between memory and disk, and the
:class:`ShardIndex` it reads), the target encoding recorded in a manifest, a shard's SHA-256,
and the completion markers (``<shard>.done.json``) that say which shards are closed.
"""
from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.cache.codec import Encoding
from pipeline.cache.manifest import Manifest, ShardEntry
from pipeline.storage import Folder, RemotePath

MARKER_SUFFIX = ".done.json"
TMP_SUFFIX = ".tmp"


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
