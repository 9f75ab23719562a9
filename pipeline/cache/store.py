"""The cache's record and the writer/reader interface every backend implements."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeline.cache.manifest import Manifest, ShardEntry


@dataclass
class CacheRecord:
    """Teacher targets of one sample (T tokens, T-1 positions).

    Attributes:
        sample_id: unique string ID.
        input_ids: (T,) int32 tokens.
        loss_mask: (T,) bool; position t is valid iff ``loss_mask[t+1]``.
        topk_ids: (T-1, k) integer token IDs (uint16 when the vocabulary allows, else int32).
        topk_logprobs: (T-1, k) float16/float32 teacher log-probabilities, sorted descending.
        tail_logprob: (T-1,) float32 log of the teacher mass outside the top-k.
        teacher_nll_sum: teacher's summed negative log-likelihood of the actual next tokens
            over the valid positions (nats).
    """

    sample_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logprob: np.ndarray
    teacher_nll_sum: float

    @property
    def n_valid(self) -> int:
        return int(self.loss_mask[1:].sum())


class CacheWriter(Protocol):
    """Per-rank writer: buffers records and closes shards atomically (temp name → rename →
    completion marker)."""

    def write(self, records: list[CacheRecord]) -> None: ...

    def close(self) -> list[ShardEntry]:
        """Flush the open shard; returns the shards this writer closed."""
        ...


class CacheReader(Protocol):
    """Random access by index or sample ID over every closed shard of a cache."""

    manifest: Manifest
    sample_ids: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> CacheRecord: ...

    def index_of(self, sample_id: str) -> int: ...

    def lengths(self) -> np.ndarray:
        """(N,) int64 token count of every sample."""
        ...
