"""The cache manifest: what a cache holds and whether it is complete (DESIGN.md, Cache store).

``manifest.json`` is rewritten atomically (temporary file, then rename; on an object store one
PUT). ``complete`` is
true only after every rank has closed all its shards.
"""
from __future__ import annotations

import math

import json
import os
import time
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.storage.errors import writing
from pipeline.storage import Folder

FORMAT_VERSION = 2
MANIFEST = "manifest.json"


class TeacherEntry(BaseModel):
    """One teacher of the cache: its path and its weight in the ensemble."""

    path: str
    weight: float
    fingerprint: str


class ShardEntry(BaseModel):
    """A closed shard: its file name (relative to the cache dir), writer rank and counts."""

    file: str
    rank: int
    num_samples: int
    num_tokens: int
    num_valid_positions: int
    teacher_nll_sum: float
    sha256: str


class Manifest(BaseModel):
    """Everything a reader needs to trust and decode a cache.

    ``header()`` is the part that must match for a rerun to append to an existing cache.
    """

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    backend: str
    k: int
    index_dtype: str
    value_dtype: str
    """float32 | float16 | bfloat16 | q8 (pipeline.cache.codec)."""
    index_coding: str = "plain"
    """plain (ids in probability order) | delta (sorted ids stored as gaps)."""
    q8_step: float = 1 / 8
    """Nats per code of q8 values."""
    compression: str = "zstd"
    vocab_size: int
    temperature: float
    target_type: str = "topk"
    """``topk`` (exact top-k), ``sampled`` (unique ids of ``num_draws`` draws, value = log of the
    estimated probability) or ``topk+sampled`` (exact top ``head_k`` plus a sampled tail)."""
    num_draws: int = 0
    head_k: int = 0
    sample_temperature: float = 1.0
    sample_seed: int = 0
    """``targets.seed`` of the sampled types: a resumed run must draw with the same seed."""
    tokenizer_fingerprint: str
    tokenizer_name: str = ""
    """The teacher tokenizer's ``name_or_path`` when the cache was written (informational: the
    tokenizer itself is saved in the cache's ``tokenizer/``, identified by its fingerprint)."""
    text_offsets: str = "none"
    """``none``, or ``char``: every sample also stores its text and the character span
    ``[start, end)`` of each teacher token in it (Unicode code points), so that stage 2 can
    align another tokenizer's tokens to the teacher's (cross-tokenizer distillation)."""
    teachers: list[TeacherEntry]
    combine: str = "probability"
    """How an ensemble was combined: ``probability`` (mixture) or ``logit_mean`` (geometric mean)."""
    dataset: dict
    dataset_fingerprint: str
    max_length: int
    num_samples: int = 0
    num_tokens: int = 0
    num_valid_positions: int = 0
    teacher_nll_sum: float = 0.0
    """Sum over valid positions of the teacher's negative log-probability of the actual
    next token: ``exp(teacher_nll_sum / num_valid_positions)`` is the teacher perplexity."""
    skipped_empty: int = 0
    shards: list[ShardEntry] = Field(default_factory=list)
    complete: bool = False
    updated_at: float = 0.0

    HEADER_KEYS: ClassVar[tuple[str, ...]] = ("format_version", "backend", "k", "index_dtype", "value_dtype", "index_coding",
                          "q8_step", "vocab_size",
                          "temperature", "target_type", "num_draws", "head_k", "sample_temperature",
                          "sample_seed", "tokenizer_fingerprint", "text_offsets", "teachers", "combine", "dataset_fingerprint", "max_length")

    @property
    def teacher_perplexity(self) -> float:
        """The teacher's perplexity on the cache's valid positions, ``exp(teacher_nll_sum /
        num_valid_positions)`` (1.0 for a cache without valid positions)."""
        return math.exp(self.teacher_nll_sum / max(self.num_valid_positions, 1))

    def header(self) -> dict:
        """The fields that must match for a rerun to resume the cache (:attr:`HEADER_KEYS`)."""
        return {k: getattr(self, k) for k in self.HEADER_KEYS}

    def header_diff(self, other: "Manifest") -> list[str]:
        """Human-readable differences between two headers (empty when compatible)."""
        a, b = self.model_dump(), other.model_dump()
        return [f"{k}: {a[k]!r} != {b[k]!r}" for k in self.HEADER_KEYS if a[k] != b[k]]


def read_manifest(cache_dir: str | os.PathLike) -> Manifest:
    """Read and validate ``manifest.json``.

    Raises:
        FileNotFoundError: the directory has no manifest (the path is named).
        StoreError: (store) the request failed (:meth:`pipeline.storage.Folder.read_bytes`).
        ValueError: the manifest is not valid JSON or misses / mistypes a field (edited by
            hand?); the file and the first problem are named.
    """
    folder = Folder(cache_dir)
    p = folder.join(MANIFEST)
    try:
        text = folder.read_bytes(MANIFEST)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        where = f"{e}" if folder.is_remote else cache_dir  # on a store: "URL/manifest.json: no such object"
        raise FileNotFoundError(f"not a teacher cache (no {MANIFEST}): {where}") from None
    try:
        return Manifest.model_validate_json(text)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "(top level)"
        raise ValueError(f"{p}: invalid manifest at {where}: {err.get('msg')}") from None


def write_manifest(cache_dir: str | os.PathLike, manifest: Manifest) -> None:
    """Write ``manifest.json``: locally to a temporary name, then renamed; on a remote store as
    one object (a PUT replaces it whole).

    Raises:
        StorageError: an I/O error (the previous manifest stays as it was).
    """
    manifest.updated_at = time.time()
    folder = Folder(cache_dir)
    # locally manifest.json.tmp renamed over manifest.json; on a store one PUT
    with writing("the manifest", folder.join(MANIFEST)):  # the previous manifest stays as it was
        folder.write_bytes(MANIFEST, json.dumps(manifest.model_dump(), indent=1).encode())
