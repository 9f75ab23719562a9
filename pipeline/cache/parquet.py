"""Parquet backend: one row per sample, per-rank part files, small row groups.

Schema of a shard (k fixed per cache; ``idx`` = uint16 | int32, ``val`` per
:mod:`pipeline.cache.codec`)::

    sample_id        string
    sample_id_hash   uint64                           pipeline.sample_ids.id_hash (absent in older shards)
    num_tokens       int32                            T
    teacher_nll_sum  float64
    input_ids        list<idx>                        (T)
    loss_mask        list<bool>                       (T)
    topk_ids         list<fixed_size_list<idx, k>>    (T-1, k)   plain ids or id gaps
    topk_values      list<fixed_size_list<val, k>>    (T-1, k)
    tail_logprob     list<float32 | float16>          (T-1)
    value_ref        list<float16>                    (T-1)      q8 only
    text             string                                      text_offsets only
    offsets          list<fixed_size_list<int32, 2>>  (T, 2)     text_offsets only

Compressed with zstd. A row group is the unit of random access: ``row_group_size`` rows. The
schema metadata key ``kd_index`` holds the reader's index (``num_tokens`` as little-endian
int32, then ``sample_id_hash`` as little-endian uint64), so opening reads only footers.

Every page carries a CRC-32 of its bytes (parquet's page checksum; the footer key
``kd_page_crc`` says so) and the reader verifies it on every page it decodes: a flipped or
truncated byte of a block is caught when that block is read, locally or from a bucket, without
hashing the whole shard first (:class:`pipeline.cache.reader.CacheReader`). Shards written
before the key existed have no page checksums and are hashed whole instead.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cache.handles import MAX_OPEN_SHARDS, HandleLRU
from pipeline.cache.shards import ShardIndex
from pipeline.sample_ids import id_hashes
from pipeline.storage import RemotePath


def _source(path):
    """What pyarrow opens: a local path, or a remote shard's file object (ranged reads)."""
    return path.remote.open(path.name) if isinstance(path, RemotePath) else path

INDEX_KEY = b"kd_index"
PAGE_CRC_KEY = b"kd_page_crc"
_PER_TOKEN = ("input_ids", "loss_mask")
_PER_POSITION = ("topk_ids", "topk_values", "tail_logprob", "value_ref")


WHOLE_SHARD_BYTES = 8 << 20
"""With ``ParquetBackend.whole_shards``, a remote shard up to this size is fetched whole, in one
request, when it is first read (its blocks are then decoded from memory); a larger one, or any
without, block by block (one ranged request each)."""


def _read_footer(path) -> pq.FileMetaData:
    """A shard's parsed footer. From a store, two ranged reads of exactly the footer's bytes:
    the 8-byte trailer (footer length, magic), then the footer (pyarrow alone reads a fixed
    64 KiB tail first and the rest again when the footer is longer, about 1.5× its bytes)."""
    if not isinstance(path, RemotePath):
        return pq.read_metadata(path)
    with _source(path) as f:
        return _footer_of(f, f.size, path)


def _footer_of(f, size: int, path) -> pq.FileMetaData:
    f.seek(size - 8)
    trailer = f.read(8)
    n = int.from_bytes(trailer[:4], "little")
    if trailer[4:] != b"PAR1" or n + 12 > size:
        raise ValueError(f"shard {path}: not a parquet file (trailer {trailer!r})")
    f.seek(size - 8 - n)
    footer = f.read(n)
    return pq.read_metadata(pa.BufferReader(b"PAR1" + footer + trailer))  # parsed alone: offsets stay the file's


def _shared_part(path, whole: bool) -> pq.FileMetaData | pa.Buffer:
    """What the reading threads of one reader share of a shard: a small remote shard's bytes
    (fetched whole, with ``whole``), else its parsed footer (fetched once, not once per thread)."""
    if not isinstance(path, RemotePath):
        return pq.read_metadata(path)
    with _source(path) as f:
        if whole and f.size <= WHOLE_SHARD_BYTES:
            return pa.py_buffer(f.read())
        return _footer_of(f, f.size, path)


class _OpenShard:
    """A shard opened for block reads by one thread: the file (page checksums verified), over
    what the threads share (:func:`_shared_part`: the shard's bytes, or its parsed footer), and
    the columns a block read asks for, resolved once (building the Arrow schema from the footer,
    24 KB of index included, costs about as much as decoding a small block)."""

    def __init__(self, path, shared: pq.FileMetaData | pa.Buffer):
        if isinstance(shared, pa.Buffer):
            self.file = pq.ParquetFile(pa.BufferReader(shared), page_checksum_verification=True)
        else:
            self.file = pq.ParquetFile(_source(path), metadata=shared, page_checksum_verification=True)
        names = set(self.file.schema_arrow.names)
        self.arrays = [n for n in _PER_TOKEN + _PER_POSITION + ("offsets",) if n in names]
        self.columns = self.arrays + ["sample_id", "teacher_nll_sum"] + (["text"] if "offsets" in names else [])

    def close(self) -> None:
        self.file.close(force=True)


class ParquetBackend:
    """:class:`pipeline.cache.shards.ShardBackend` over parquet files.

    Args:
        compression: parquet codec name (``zstd``, ``none``...). compression_level: codec level.
        page_checksums: write a CRC-32 into every page (the reader checks it on each read); off
            only to write shards as older versions did (tests).
        max_open: shards kept open per reading thread (:class:`~pipeline.cache.handles.HandleLRU`).

    Attributes:
        whole_shards: fetch a remote shard of at most ``WHOLE_SHARD_BYTES`` whole on its first
            read, for a loader that reads all blocks of a shard in a short time (the ``streams``
            shuffle: one request per shard instead of one per block, each byte once); off for
            random access, where it would download a shard for one block.
    """

    suffix = ".parquet"

    def __init__(self, compression: str = "zstd", compression_level: int | None = 3, page_checksums: bool = True,
                 max_open: int = MAX_OPEN_SHARDS):
        self.compression, self.compression_level = compression, compression_level
        self.page_checksums, self.max_open = page_checksums, max_open
        self._local = threading.local()  # per-thread open shards (a ParquetFile is read by one thread)
        self.whole_shards = False
        self._shared = HandleLRU(lambda p: _shared_part(p, self.whole_shards), max_open)  # shared by the threads

    def _open(self, path) -> _OpenShard:
        files = getattr(self._local, "files", None)
        if files is None:
            files = self._local.files = HandleLRU(lambda p: _OpenShard(p, self._shared.get(p)), self.max_open,
                                                  close=_OpenShard.close)
        return files.get(path)

    def write_shard(self, path: Path, arrays: dict, k: int, block_size: int) -> None:
        n_tok = arrays["num_tokens"].astype(np.int64)
        tok_off = pa.array(np.concatenate([[0], np.cumsum(n_tok)]).astype(np.int32))
        pos_off = pa.array(np.concatenate([[0], np.cumsum(n_tok - 1)]).astype(np.int32))
        cols = {"sample_id": pa.array(arrays["sample_id"], pa.string()),
                "sample_id_hash": pa.array(np.asarray(arrays["sample_id_hash"], dtype=np.uint64)),
                "num_tokens": pa.array(arrays["num_tokens"].astype(np.int32)),
                "teacher_nll_sum": pa.array(arrays["teacher_nll_sum"], pa.float64())}
        for name in _PER_TOKEN:
            cols[name] = pa.ListArray.from_arrays(tok_off, pa.array(arrays[name]))
        if "offsets" in arrays:  # cross-tokenizer caches: each sample's text and token spans
            cols["text"] = pa.array(arrays["text"], pa.string())
            cols["offsets"] = pa.ListArray.from_arrays(tok_off, pa.FixedSizeListArray.from_arrays(
                pa.array(arrays["offsets"].reshape(-1).astype(np.int32)), 2))
        for name in _PER_POSITION:
            if name not in arrays:
                continue
            a = arrays[name]
            flat = pa.array(a.reshape(-1))
            cols[name] = pa.ListArray.from_arrays(pos_off, pa.FixedSizeListArray.from_arrays(flat, k) if a.ndim == 2 else flat)
        level = self.compression_level if self.compression != "none" else None
        # Target columns: no dictionary, byte-stream split (each byte plane of the values in its
        # own stream, so zstd sees the mostly-constant high bytes of small id gaps together):
        # measured 21.7 vs 29.1 bytes/position for the k=64 id gaps of the real teacher, 41 vs 59
        # for a V=32k teacher. Options take leaf column paths.
        leaf = {name: name + (".list.element.list.element" if name in ("topk_ids", "topk_values", "offsets")
                              else ".list.element") for name in _PER_TOKEN + _PER_POSITION + ("offsets",)}
        split = [leaf[c] for c in _PER_POSITION + ("offsets",) if c in cols]
        dictionary = ["sample_id", "num_tokens", "teacher_nll_sum"] + [leaf[c] for c in _PER_TOKEN]
        # the reader's index in the footer (read with the metadata, no column pages: open cost
        # per shard ~0.5 ms instead of ~4 ms for two columns over every row group)
        meta = {INDEX_KEY: (np.asarray(arrays["num_tokens"], dtype="<i4").tobytes()
                            + np.asarray(arrays["sample_id_hash"], dtype="<u8").tobytes())}
        if self.page_checksums:
            meta[PAGE_CRC_KEY] = b"1"
        pq.write_table(pa.table(cols).replace_schema_metadata(meta), path, row_group_size=block_size,
                       compression=self.compression, compression_level=level, use_dictionary=dictionary,
                       use_byte_stream_split=split, write_page_checksum=self.page_checksums)

    def read_index(self, path: Path) -> ShardIndex:
        f = pq.ParquetFile(_source(path), metadata=_read_footer(path) if isinstance(path, RemotePath) else None)
        sizes = [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        meta = f.schema_arrow.metadata or {}
        raw, crc = meta.get(INDEX_KEY), meta.get(PAGE_CRC_KEY) == b"1"
        n = int(starts[-1])
        if raw is not None and len(raw) == 12 * n:
            return ShardIndex(np.frombuffer(raw, "<i4", n).astype(np.int32), starts,
                              np.frombuffer(raw, "<u8", n, offset=4 * n).astype(np.uint64), page_checksums=crc)
        has_hash = "sample_id_hash" in f.schema_arrow.names  # shards written before the footer index
        t = f.read(columns=["num_tokens", "sample_id_hash" if has_hash else "sample_id"])
        hashes = (t.column("sample_id_hash").to_numpy().astype(np.uint64, copy=False) if has_hash
                  else id_hashes(t.column("sample_id").to_pylist()))
        return ShardIndex(t.column("num_tokens").to_numpy().astype(np.int32, copy=False), starts, hashes,
                          page_checksums=crc)

    def read_column(self, path: Path, name: str):
        f = pq.ParquetFile(_source(path))
        if name not in f.schema_arrow.names:
            raise KeyError(f"shard {path}: no column {name!r}")
        col = f.read(columns=[name]).column(name)
        return col.to_pylist() if name == "sample_id" else col.to_numpy()

    def read_block(self, path: Path, index: ShardIndex, block: int) -> dict:
        shard = self._open(path)
        t = shard.file.read_row_group(block, columns=shard.columns)
        out = {"sample_id": t.column("sample_id").to_pylist(), "teacher_nll_sum": t.column("teacher_nll_sum").to_numpy()}
        if "offsets" in shard.arrays:
            out["text"] = t.column("text").to_pylist()
        for name in shard.arrays:
            col = t.column(name)
            arr = col.chunk(0) if col.num_chunks == 1 else pa.concat_arrays(col.chunks)
            flat = arr.flatten()
            if pa.types.is_fixed_size_list(flat.type):
                out[name] = flat.flatten().to_numpy(zero_copy_only=False).reshape(len(flat), flat.type.list_size)
            else:
                out[name] = flat.to_numpy(zero_copy_only=False)
        return out
