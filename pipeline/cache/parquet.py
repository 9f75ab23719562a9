"""Parquet backend: one row per sample, per-rank part files, small row groups.

Schema (k fixed per cache)::

    sample_id        string
    input_ids        list<int32>                      (T)
    loss_mask        list<bool>                       (T)
    topk_ids         list<fixed_size_list<idx, k>>    (T-1, k)   idx = uint16 | int32
    topk_logprobs    list<fixed_size_list<val, k>>    (T-1, k)   val = float16 | float32
    tail_logprob     list<float32>                    (T-1)
    teacher_nll_sum  float64

Files are compressed with zstd. Each shard is written as ``<name>.tmp``, renamed, and only
then gets its completion marker ``<name>.done.json`` (a :class:`ShardEntry`).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.manifest import Manifest, ShardEntry
from pipeline.cache.store import CacheRecord

MARKER_SUFFIX = ".done.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _nested(offsets: np.ndarray, flat: np.ndarray, k: int) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), k))


def records_to_table(records: list[CacheRecord], k: int, index_dtype: str, value_dtype: str) -> pa.Table:
    """Columnar arrow table of records (see the module docstring for the schema)."""
    n_tok = np.array([len(r.input_ids) for r in records], dtype=np.int64)
    tok_off = np.concatenate([[0], np.cumsum(n_tok)]).astype(np.int32)
    pos_off = np.concatenate([[0], np.cumsum(n_tok - 1)]).astype(np.int32)
    cat = np.concatenate
    return pa.table({
        "sample_id": pa.array([r.sample_id for r in records], pa.string()),
        "input_ids": pa.ListArray.from_arrays(pa.array(tok_off), pa.array(cat([r.input_ids for r in records]).astype(np.int32))),
        "loss_mask": pa.ListArray.from_arrays(pa.array(tok_off), pa.array(cat([r.loss_mask for r in records]).astype(bool))),
        "topk_ids": _nested(pos_off, cat([r.topk_ids for r in records]).astype(index_dtype), k),
        "topk_logprobs": _nested(pos_off, cat([r.topk_logprobs for r in records]).astype(value_dtype), k),
        "tail_logprob": pa.ListArray.from_arrays(pa.array(pos_off), pa.array(cat([r.tail_logprob for r in records]).astype(np.float32))),
        "teacher_nll_sum": pa.array([r.teacher_nll_sum for r in records], pa.float64()),
    })


class ParquetCacheWriter:
    """Writes this rank's records to ``part-r{rank}-a{attempt}-{n}.parquet`` shards."""

    def __init__(self, cache_dir: str | os.PathLike, manifest: Manifest, rank: int, attempt: int,
                 samples_per_shard: int, row_group_size: int):
        self.dir = Path(cache_dir)
        self.m = manifest
        self.rank, self.attempt = rank, attempt
        self.samples_per_shard, self.row_group_size = samples_per_shard, row_group_size
        self.buffer: list[CacheRecord] = []
        self.closed: list[ShardEntry] = []

    def write(self, records: list[CacheRecord]) -> None:
        self.buffer.extend(records)
        while len(self.buffer) >= self.samples_per_shard:
            self._flush(self.buffer[: self.samples_per_shard])
            self.buffer = self.buffer[self.samples_per_shard:]

    def close(self) -> list[ShardEntry]:
        if self.buffer:
            self._flush(self.buffer)
            self.buffer = []
        return self.closed

    def _flush(self, records: list[CacheRecord]) -> None:
        name = f"part-r{self.rank:05d}-a{self.attempt}-{len(self.closed):05d}.parquet"
        final = self.dir / name
        tmp = self.dir / (name + ".tmp")
        table = records_to_table(records, self.m.k, self.m.index_dtype, self.m.value_dtype)
        pq.write_table(table, tmp, row_group_size=self.row_group_size, compression="zstd")
        os.replace(tmp, final)
        entry = ShardEntry(file=name, rank=self.rank, num_samples=len(records),
                           num_tokens=int(sum(len(r.input_ids) for r in records)),
                           num_valid_positions=int(sum(r.n_valid for r in records)),
                           teacher_nll_sum=float(sum(r.teacher_nll_sum for r in records)), sha256=_sha256(final))
        marker = self.dir / (name + MARKER_SUFFIX)
        marker.with_suffix(".tmp").write_text(entry.model_dump_json())
        os.replace(marker.with_suffix(".tmp"), marker)
        self.closed.append(entry)


def closed_shards(cache_dir: str | os.PathLike) -> list[ShardEntry]:
    """Shards with a completion marker, in file-name order (unmarked files are ignored)."""
    return [ShardEntry.model_validate_json(p.read_text()) for p in sorted(Path(cache_dir).glob("*" + MARKER_SUFFIX))]


def shard_sample_ids(cache_dir: str | os.PathLike, shard: ShardEntry) -> list[str]:
    return pq.read_table(Path(cache_dir) / shard.file, columns=["sample_id"]).column(0).to_pylist()


class ParquetCacheReader:
    """Loads every closed shard into memory as flat numpy arrays plus per-sample offsets.

    Random access (``reader[i]``, ``index_of(sample_id)``) is then O(1) slicing.
    Memory: about the cache's uncompressed size (bytes/token × tokens).
    """

    def __init__(self, cache_dir: str | os.PathLike, manifest: Manifest, shards: list[ShardEntry], verify: bool = True):
        self.dir = Path(cache_dir)
        self.manifest = manifest
        self.shards = shards
        tables = []
        for s in shards:
            path = self.dir / s.file
            if not path.is_file():
                raise FileNotFoundError(f"cache {self.dir}: shard {s.file} listed but missing")
            if verify and _sha256(path) != s.sha256:
                raise ValueError(f"cache {self.dir}: shard {s.file} checksum mismatch (file changed or corrupt)")
            tables.append(pq.read_table(path))
        if not tables:
            raise ValueError(f"cache {self.dir}: no closed shard")
        t = pa.concat_tables(tables).combine_chunks()
        self.shard_of = np.repeat(np.arange(len(shards)), [s.num_samples for s in shards])
        self.sample_ids: list[str] = t.column("sample_id").to_pylist()
        k = manifest.k

        def col(name: str) -> pa.Array:
            c = t.column(name)
            return c.chunk(0) if c.num_chunks == 1 else pa.concat_arrays(c.chunks)

        ids, mask = col("input_ids"), col("loss_mask")
        self.tok_off = ids.offsets.to_numpy().astype(np.int64)
        self.input_ids = ids.values.to_numpy(zero_copy_only=False)
        self.loss_mask = mask.values.to_numpy(zero_copy_only=False)
        tk, tl, tail = col("topk_ids"), col("topk_logprobs"), col("tail_logprob")
        self.pos_off = tk.offsets.to_numpy().astype(np.int64)
        self.topk_ids = tk.values.values.to_numpy(zero_copy_only=False).reshape(-1, k)
        self.topk_logprobs = tl.values.values.to_numpy(zero_copy_only=False).reshape(-1, k)
        self.tail_logprob = tail.values.to_numpy(zero_copy_only=False)
        self.teacher_nll_sum = col("teacher_nll_sum").to_numpy()
        self._index = {sid: i for i, sid in enumerate(self.sample_ids)}
        if len(self._index) != len(self.sample_ids):
            dup = next(s for i, s in enumerate(self.sample_ids) if self._index[s] != i)
            raise ValueError(f"cache {self.dir}: duplicate sample_id {dup!r} across shards")

    def __len__(self) -> int:
        return len(self.sample_ids)

    def index_of(self, sample_id: str) -> int:
        try:
            return self._index[sample_id]
        except KeyError:
            raise KeyError(f"cache {self.dir}: no sample_id {sample_id!r}") from None

    def lengths(self) -> np.ndarray:
        return np.diff(self.tok_off)

    def __getitem__(self, i: int) -> CacheRecord:
        a, b = self.tok_off[i], self.tok_off[i + 1]
        p, q = self.pos_off[i], self.pos_off[i + 1]
        return CacheRecord(self.sample_ids[i], self.input_ids[a:b], self.loss_mask[a:b], self.topk_ids[p:q],
                           self.topk_logprobs[p:q], self.tail_logprob[p:q], float(self.teacher_nll_sum[i]))

    def shard_name(self, i: int) -> str:
        return self.shards[self.shard_of[i]].file
