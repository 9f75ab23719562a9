"""Zarr v3 backend: token-major arrays plus per-sample lengths, one group per closed shard.

Layout of a shard group ``part-r{rank}-a{attempt}-{n}.zarr`` (each rank writes only its own
groups, as whole shards: PLATFORM.md measured data loss when writers share a zarr shard)::

    sample_id        (n,)        string
    sample_id_hash   (n,)        uint64      pipeline.sample_ids.id_hash (absent in older shards)
    num_tokens       (n,)        int32       T of each sample (offsets are its cumsum)
    teacher_nll_sum  (n,)        float64
    input_ids        (T_total,)  idx
    loss_mask        (T_total,)  bool
    topk_ids         (P_total, k) idx        plain ids or id gaps (pipeline.cache.codec)
    topk_values      (P_total, k) val
    tail_logprob     (P_total,)  float32 | float16
    value_ref        (P_total,)  float16     q8 only
    text             (n,)        string      text_offsets only
    offsets          (T_total, 2) int32      text_offsets only

Arrays use the sharding codec (one shard object per array, ``chunk_positions`` rows per
inner chunk, so a sample's rows are read without decompressing the whole array) and zstd
(after Blosc's byte shuffle for multi-byte dtypes).
Group attribute ``block_size``: samples per logical block (the reader's unit of caching).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.cache.handles import HandleLRU
from pipeline.cache.shards import ShardIndex
from pipeline.sample_ids import id_hashes
from pipeline.storage import RemotePath


def _store(path):
    """What zarr opens: a local path, or a remote shard's ``FsspecStore`` (ranged chunk reads)."""
    return path.remote.zarr_store(path.name) if isinstance(path, RemotePath) else str(path)

_PER_TOKEN = ("input_ids", "loss_mask", "offsets")
_PER_POSITION = ("topk_ids", "topk_values", "tail_logprob", "value_ref")


class ZarrBackend:
    """:class:`pipeline.cache.shards.ShardBackend` over zarr v3 groups.

    Args:
        compression: ``zstd`` or ``none``. compression_level: zstd level.
        chunk_positions: rows (positions or tokens) per inner chunk.
    """

    suffix = ".zarr"

    def __init__(self, compression: str = "zstd", compression_level: int | None = 3, chunk_positions: int = 4096):
        self.compression, self.compression_level = compression, compression_level
        self.chunk_positions = chunk_positions
        # open read-only arrays per shard group (zarr arrays are safe to read from threads)
        self._arrays: HandleLRU[dict] = HandleLRU(self._open_group)

    @staticmethod
    def _open_group(path) -> dict:
        import zarr

        g = zarr.open_group(_store(path), mode="r", zarr_format=3)
        names = _PER_TOKEN + _PER_POSITION + ("sample_id", "teacher_nll_sum", "text")
        return {name: g[name] for name in names if name in g}

    def _open_arrays(self, path: Path) -> dict:
        """The per-token and per-position arrays of a shard group, kept open (LRU)."""
        return self._arrays.get(path)

    def _compressors(self, itemsize: int = 1):
        """zstd; multi-byte arrays go through Blosc's byte shuffle first (the same byte-plane
        split as parquet's BYTE_STREAM_SPLIT, see pipeline/cache/parquet.py)."""
        import zarr

        if self.compression == "none":
            return None
        if self.compression != "zstd":
            raise ValueError(f"zarr backend: compression {self.compression!r} is not zstd or none")
        if itemsize > 1:
            return zarr.codecs.BloscCodec(cname="zstd", clevel=self.compression_level or 3, shuffle="shuffle",
                                          typesize=itemsize)
        return zarr.codecs.ZstdCodec(level=self.compression_level or 3)

    def write_shard(self, path: Path, arrays: dict, k: int, block_size: int) -> None:
        import zarr

        g = zarr.open_group(str(path), mode="w", zarr_format=3)
        g.attrs["block_size"] = int(block_size)
        n = len(arrays["sample_id"])
        g.create_array("sample_id", shape=(n,), dtype=str, chunks=(max(n, 1),))[:] = np.array(arrays["sample_id"], dtype=object)
        if "text" in arrays:
            g.create_array("text", shape=(n,), dtype=str, chunks=(max(n, 1),))[:] = np.array(arrays["text"], dtype=object)
        for name in ("sample_id_hash", "num_tokens", "teacher_nll_sum"):
            a = np.asarray(arrays[name])
            g.create_array(name, shape=a.shape, dtype=a.dtype, chunks=(max(n, 1),), compressors=self._compressors())[:] = a
        for name in _PER_TOKEN + _PER_POSITION:
            if name not in arrays:
                continue
            a = np.ascontiguousarray(arrays[name])
            rows = max(len(a), 1)
            inner = min(self.chunk_positions, rows)
            shard_rows = -(-rows // inner) * inner
            chunks, shards = (inner,) + a.shape[1:], (shard_rows,) + a.shape[1:]
            z = g.create_array(name, shape=a.shape, dtype=a.dtype, chunks=chunks, shards=shards,
                               compressors=self._compressors(a.dtype.itemsize))
            if len(a):
                z[:] = a

    def read_index(self, path: Path) -> ShardIndex:
        import zarr

        g = zarr.open_group(_store(path), mode="r", zarr_format=3)
        n_tok = np.asarray(g["num_tokens"][:]).astype(np.int32, copy=False)
        hashes = (np.asarray(g["sample_id_hash"][:]).astype(np.uint64, copy=False) if "sample_id_hash" in g
                  else id_hashes(str(s) for s in g["sample_id"][:]))
        bs = int(g.attrs["block_size"])
        starts = np.unique(np.concatenate([np.arange(0, len(n_tok), bs), [len(n_tok)]])).astype(np.int64)
        return ShardIndex(n_tok, starts, hashes)

    def read_column(self, path: Path, name: str):
        import zarr

        g = zarr.open_group(_store(path), mode="r", zarr_format=3)
        if name not in g:
            raise KeyError(f"shard {path}: no column {name!r}")
        a = g[name][:]
        return [str(s) for s in a] if name == "sample_id" else np.asarray(a)

    def read_block(self, path: Path, index: ShardIndex, block: int) -> dict:
        arrays = self._open_arrays(path)
        lo, hi = int(index.block_starts[block]), int(index.block_starts[block + 1])
        t0 = int(index.num_tokens[:lo].sum(dtype=np.int64))
        t1 = t0 + int(index.num_tokens[lo:hi].sum(dtype=np.int64))
        p0, p1 = t0 - lo, t1 - hi  # positions = tokens - 1 per sample
        out = {name: np.asarray(a[t0:t1] if name in _PER_TOKEN else a[p0:p1]) for name, a in arrays.items()
               if name in _PER_TOKEN + _PER_POSITION}
        out["sample_id"] = [str(s) for s in arrays["sample_id"][lo:hi]]
        out["teacher_nll_sum"] = np.asarray(arrays["teacher_nll_sum"][lo:hi])
        if "text" in arrays:
            out["text"] = [str(x) for x in arrays["text"][lo:hi]]
        return out
