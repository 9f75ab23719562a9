"""A dataset's samples with random access in bounded memory (:class:`DatasetSamples`): stage 2's
source when it trains from ``data.train_dataset`` without a teacher cache.

The rows stay in the memory-mapped ``datasets.Dataset`` (:func:`~pipeline.data.load_rows`); one
streaming pass over them (:class:`~pipeline.data.SampleWindows`, stage 1's input: each rank
tokenizes its part of every window) counts the samples, checks their IDs are unique and keeps
per sample only the row it comes from (8 bytes) and its ID hash (8 bytes, for ``index_of``).
A sample is tokenized again from its row when it is read, so host memory does not grow with
the dataset's tokens.
"""
from __future__ import annotations

import threading

import numpy as np

from pipeline.config import DatasetConfig
from pipeline.data.formats import resolve_format
from pipeline.data.samples import Sample, SampleWindows, tokenize_part
from pipeline.sample_ids import HashIndex, id_hashes


class DatasetSamples:
    """Sample ``i`` of a dataset, the same samples in the same order as
    :func:`~pipeline.data.load_samples` (every row tokenized, empty samples skipped, ``overflow``
    applied), without holding them.

    Sample ``i`` is the ``k``-th sample of row ``rows[i]``, ``k = i - (first sample of that
    row)``; reading it tokenizes that one row again (under a lock: a fast tokenizer refuses
    concurrent calls that change its truncation). ``index_of`` looks the ID's 64-bit hash up
    (:class:`~pipeline.sample_ids.HashIndex`, built on the first call) and confirms the ID by reading
    the sample's ID back. Resident bookkeeping: 16 bytes per sample (row and ID hash; after the
    first ``index_of``, row, hash and a 4-byte sample index: 20 bytes).

    Args:
        cfg: the dataset. tokenizer: a Hugging Face tokenizer. window_rows: rows per window of
            the streaming pass. rank, world_size, gather: as :class:`SampleWindows` (every rank
            must construct it at the same point: the pass is collective).
    Attributes:
        fingerprint: the dataset fingerprint (rows + tokenization options). skipped: empty
            samples skipped. rows: (N,) int64 the row of every sample.
    Raises:
        As :class:`SampleWindows` (a bad row, a duplicate sample ID, no usable sample).
    """

    def __init__(self, cfg: DatasetConfig, tokenizer, window_rows: int = 1024, rank: int = 0,
                 world_size: int = 1, gather=None):
        self.cfg, self.tokenizer = cfg, tokenizer
        windows = SampleWindows(cfg, tokenizer, window_rows, rank, world_size, gather)
        rows, hashes = [], []
        for _, samples in windows:
            rows.append(np.fromiter((s.row for s in samples), dtype=np.int64, count=len(samples)))
            hashes.append(id_hashes(s.sample_id for s in samples))
        self.ds, self.fingerprint, self.skipped = windows.ds, windows.fingerprint, windows.skipped
        self.rows = np.concatenate(rows)
        self._hashes: np.ndarray | None = np.concatenate(hashes)
        self._index: HashIndex | None = None
        self._lock = threading.Lock()
        fmt, _ = resolve_format(cfg, self.ds.column_names)
        id_field = cfg.id_field or ("id" if fmt == "generated" else None)
        self._ids = None if id_field is None else (self.ds.select_columns([id_field]), id_field)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        """Resident bytes of the per-sample bookkeeping (rows, hashes or the hash index)."""
        return self.rows.nbytes + (self._hashes.nbytes if self._hashes is not None else 0) + (
            self._index.nbytes if self._index is not None else 0)

    def _row_samples(self, row: int) -> list[Sample]:
        with self._lock:
            return tokenize_part(self.ds.select([row]), self.tokenizer, self.cfg, row, self.ds._fingerprint)[0]

    def __getitem__(self, i: int) -> Sample:
        """Sample ``i`` (tokenized from its row now). Raises IndexError outside ``[0, len)``."""
        if not 0 <= i < len(self.rows):
            raise IndexError(f"dataset {self.cfg.path}: sample {i} of {len(self.rows)}")
        row = int(self.rows[i])
        k = i - int(np.searchsorted(self.rows, row, side="left"))
        return self._row_samples(row)[k]

    def sample_id(self, i: int) -> str:
        """The ID of sample ``i``: read from the row's ID column (or its row number) without
        tokenizing, except with ``overflow: window`` (the window number needs the tokens)."""
        row = int(self.rows[i])
        if self.cfg.overflow == "window":
            return self[i].sample_id
        if self._ids is None:
            return f"{self.ds._fingerprint[:16]}-{row}"
        return str(self._ids[0][row][self._ids[1]])

    def indices_of(self, sample_ids: list[str]) -> np.ndarray:
        """(n,) int64 position of each ID: its hash looked up, every hit confirmed against the
        sample's ID read back (:meth:`sample_id`). Raises KeyError naming the dataset and the
        first ID it does not hold."""
        if self._index is None:
            self._index = HashIndex(np.int32 if len(self.rows) < 2**31 else np.int64)
            self._index.add(self._hashes, np.arange(len(self.rows)))
            self._hashes = None
        out = np.full(len(sample_ids), -1, dtype=np.int64)
        pos, loc = self._index.candidates(id_hashes(sample_ids))
        for p, i in zip(pos.tolist(), loc.tolist()):
            if out[p] < 0 and self.sample_id(i) == sample_ids[p]:
                out[p] = i
        if (out < 0).any():
            raise KeyError(f"dataset {self.cfg.path}: no sample_id {sample_ids[int(np.argmax(out < 0))]!r}")
        return out

    def index_of(self, sample_id: str) -> int:
        """Position of ``sample_id`` (:meth:`indices_of`). Raises KeyError naming the dataset and ID."""
        return int(self.indices_of([sample_id])[0])
