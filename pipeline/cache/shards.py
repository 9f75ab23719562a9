"""Shards on disk, shared by the writer, the reader and the backends: the backend interface
(:class:`ShardBackend`, which only moves *coded shards* between memory and disk, and the
:class:`ShardIndex` it reads), the target encoding recorded in a manifest, a shard's SHA-256,
and the completion markers (``<shard>.done.json``) that say which shards are closed.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from pipeline.cache.codec import Encoding
from pipeline.cache.manifest import Manifest, ShardEntry
from pipeline.sample_ids import id_hashes
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


def shard_id_hashes(backend: "ShardBackend", path) -> np.ndarray:
    """(n,) uint64 ID hashes of a shard: its ``sample_id_hash`` column, or hashed from its
    ``sample_id`` column when it has none (shards written before the column existed)."""
    try:
        return np.asarray(backend.read_column(path, "sample_id_hash"), dtype=np.uint64)
    except KeyError:
        return id_hashes(backend.read_column(path, "sample_id"))


@dataclass
class ShardIndex:
    """What a reader keeps of a shard without decoding its targets: no sample ID strings
    (read per block, or per shard with :meth:`ShardBackend.read_column`).

    Attributes:
        num_tokens: (n,) int32 tokens of each sample, in storage order.
        block_starts: (B+1,) int64 sample offsets of the shard's blocks.
        id_hashes: (n,) uint64 :func:`pipeline.sample_ids.id_hash` of each sample ID (the shard's
            ``sample_id_hash`` column; computed from the IDs for a shard written without it),
            or None once the caller has moved them into its own index.
        page_checksums: every page of the shard carries a checksum the backend verifies when
            it decodes the page (parquet page CRC-32), so a read block is checked without
            hashing the whole shard.
    """

    num_tokens: np.ndarray
    block_starts: np.ndarray
    id_hashes: np.ndarray | None = None
    page_checksums: bool = False

    def __len__(self) -> int:
        return len(self.num_tokens)


class ShardBackend(Protocol):
    """Moves one coded shard between memory and disk (parquet file or zarr group).

    ``arrays`` hold ``sample_id`` (list of n str), ``sample_id_hash`` (n,) uint64
    (:func:`pipeline.sample_ids.id_hashes`), ``num_tokens`` (n,) int32, ``teacher_nll_sum`` (n,) float64, ``input_ids`` (T_total,), ``loss_mask`` (T_total,) bool
    and the coded target arrays of :func:`pipeline.cache.codec.encode_targets` over
    ``P_total = T_total - n`` positions.
    """

    suffix: str

    def write_shard(self, path: Path, arrays: dict, k: int, block_size: int) -> None:
        """Write a shard at ``path`` (a path not yet existing; the caller renames it)."""
        ...

    def read_index(self, path: Path) -> ShardIndex:
        """The shard's index (lengths, block starts, ID hashes) without its targets or IDs."""
        ...

    def read_column(self, path: Path, name: str):
        """One per-sample column of the whole shard: ``sample_id`` (list of n str),
        ``sample_id_hash`` (n,) uint64, ``num_tokens``, ``teacher_nll_sum``. Raises KeyError for a
        column the shard does not hold (``sample_id_hash`` in shards written before it existed)."""
        ...

    def read_block(self, path: Path, index: ShardIndex, block: int) -> dict:
        """The ``arrays`` of the samples ``index.block_starts[block]:[block+1]``: the per-token
        and per-position arrays plus ``sample_id`` (list) and ``teacher_nll_sum``."""
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
