"""Stage-1 configuration: ``precompute-teacher`` (teachers, cache, targets)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.data import DatasetConfig
from pipeline.config.loading import (StorageOptions, _apply_storage_options, _file_url_to_path, _local_only,
                                     _Section)

class TeacherConfig(_Section):
    """One teacher of the ensemble (one teacher is the common case)."""

    path: str
    """Local Hugging Face model directory (config.json + safetensors + tokenizer)."""
    _local_path = field_validator("path")(_local_only)
    weight: float = Field(default=1.0, gt=0)
    """Mixture weight; weights are normalised to sum to 1."""


class CacheConfig(_Section):
    """The teacher cache written by stage 1."""

    dir: str
    """Output directory (created; a complete cache there is refused unless overwrite)."""
    _file_dir = field_validator("dir")(_file_url_to_path)
    backend: Literal["parquet", "zarr"] = "parquet"
    """Storage backend; readers detect it from the manifest."""
    k: int = Field(default=32, ge=1)
    """Number of teacher log-probabilities kept per position."""
    value_dtype: Literal["float32", "float16", "bfloat16", "q8"] = "q8"
    """Storage of the top-k log-probabilities: floats, or ``q8`` = 8-bit codes of the distance
    to the position's top-1 (``q8_step`` nats per code; reconstruction KL ≈ step²/24)."""
    index_coding: Literal["plain", "delta"] = "delta"
    """``delta``: each position's ids sorted and stored as gaps (smaller after zstd);
    ``plain``: ids in probability order."""
    q8_step: float = Field(default=1 / 8, gt=0, le=1)
    """Nats per q8 code; reconstruction KL ≤ about step²/24 (1/8: 2.1e-4 nats measured on the real teacher, k=64)."""
    compression: Literal["zstd", "none"] = "zstd"
    compression_level: int = Field(default=3, ge=1, le=22)
    samples_per_shard: int = Field(default=2048, ge=1)
    """Samples per closed shard (one file / zarr group per shard, per rank), at most."""
    shard_mib: float = Field(default=16, gt=0)
    """A shard is also closed once its records hold this many MiB in memory (token ids, mask,
    top-k ids and float32 log-probs: about T × (8k + 6) bytes per sample), so the writer's
    memory — about ``writer_queue_shards + 2`` shards — is bounded whatever the lengths and k
    (2,048 samples of 512 tokens at k = 64 would be 0.5 GiB)."""
    row_group_size: int = Field(default=32, ge=1)
    """Samples per block (parquet row group, zarr block): the unit of random access."""
    writer_queue_shards: int = Field(default=1, ge=0)
    """Full shards waiting for each rank's background writer thread (coding, zstd, sha256,
    write) while the teacher runs; the teacher waits when this many are pending. Each holds its
    records in memory (at most ``shard_mib``). 0: shards are written in the
    teacher loop, between forwards. The cache's bytes do not depend on it."""
    overwrite: bool = False
    text_offsets: bool = False
    """Also store every sample's text and the character span of each teacher token (``text``
    datasets, fast tokenizers): a student with another tokenizer can then be distilled from
    the cache (``loss.cross_tokenizer``). Off: the cache is written exactly as without it."""


class TargetsConfig(_Section):
    """Which sparse targets stage 1 stores per position (pipeline/teacher/sampled.py).

    ``topk``: the exact top ``cache.k``. ``sampled``: the unique ids of ``num_draws`` draws
    from the teacher distribution, value ``log(count / num_draws)`` (an unbiased estimate of
    the full distribution; Anshumann et al., ACL 2025). ``topk+sampled``: the exact top
    ``head_k`` plus ``num_draws`` draws from the rest, value ``log(tail mass · count / num_draws)``.
    """

    type: Literal["topk", "sampled", "topk+sampled"] = "topk"
    num_draws: int | None = Field(default=None, ge=1)
    """Draws per position (sampled types only); default: the sampled slots (``cache.k``, or
    ``cache.k - head_k``), which guarantees no position has more unique ids than slots."""
    head_k: int | None = Field(default=None, ge=1)
    """``topk+sampled`` only: exact head size, ``1 <= head_k < cache.k``; default ``cache.k // 2``."""
    sample_temperature: float = Field(default=1.0, gt=0)
    """Proposal temperature of the draws (relative to the cache temperature); values ≠ 1 use
    self-normalised importance weights (consistent, biased by O(1/num_draws))."""
    seed: int = 0
    """Draws of sample ``s`` use a generator seeded from ``(seed, s)``: reruns, resumed and
    multi-rank runs write the same cache."""


class PrecomputeConfig(_Section):
    """``precompute-teacher``: run the frozen teacher(s) and write sparse top-k targets."""

    storage_options: StorageOptions = Field(default_factory=dict)
    """Options of the file systems of URLs in this config (see :data:`StorageOptions`)."""
    _storage = field_validator("storage_options")(_apply_storage_options)
    teachers: list[TeacherConfig] = Field(min_length=1)
    dataset: DatasetConfig
    cache: CacheConfig
    tokenizer: str | None = None
    """Tokenizer directory; defaults to the first teacher's directory."""
    _local_path = field_validator("tokenizer")(_local_only)
    batch_size: int = Field(default=8, ge=1)
    """Sequences per teacher forward call, per rank."""
    window_rows: int = Field(default=1024, ge=1)
    """Dataset rows read and tokenized at a time (each rank tokenizes its part of a window);
    batches are length-sorted within a window. Host memory holds one window's samples, not the
    dataset; lower it for very long rows (``overflow: window`` over whole books). The batches,
    and so the cache's bits, do not depend on the world size."""
    host_memory: Literal["auto", "release", "reuse"] = "auto"
    """How glibc treats the host memory the teacher loop frees (CPU runs; on GPUs activations live
    in device memory). ``release``: large blocks go back to the OS at once (lowest peak RSS; on
    CPU the forward is slower, every large activation in fresh pages); ``reuse``: they stay in
    the heap for the next call (fastest; the heap fragments, peak RSS can double with FSDP2's
    per-block all-gathers). ``auto``: ``release`` on CPU with more than one rank, else ``reuse``."""
    temperature: float = Field(default=1.0, gt=0)
    """Cache temperature: logprobs are ``log_softmax(logits / temperature)``."""
    combine: Literal["probability", "logit_mean"] = "probability"
    """How an ensemble's teachers are combined per position (pipeline/teacher/topk.py):
    ``probability``: ``log p = logsumexp_m(log w_m + logp_m)`` (a mixture);
    ``logit_mean``: ``log p = log_softmax(Σ_m w_m logp_m)`` (normalised geometric mean)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    teacher_check: Literal["stop", "warn"] = "stop"
    """What a teacher whose perplexity on the first batch is >= V/2 (within a factor 2 of
    uniform guessing: a broken load, or an untrained model) does: ``stop`` the run with one line
    naming it, or ``warn`` (one line) and go on, for deliberately untrained teachers (tests,
    smoke runs). A teacher whose outputs are uniform stops the run either way."""
    targets: TargetsConfig = Field(default_factory=TargetsConfig)

    @model_validator(mode="after")
    def _resolve_targets(self) -> "PrecomputeConfig":
        t, k = self.targets, self.cache.k
        if t.type == "topk":
            for key in ("num_draws", "head_k"):
                if getattr(t, key) is not None:
                    raise ValueError(f"targets.{key} applies only to targets.type sampled or topk+sampled")
            if t.sample_temperature != 1.0:
                raise ValueError("targets.sample_temperature applies only to targets.type sampled or topk+sampled")
            return self
        if t.type == "sampled":
            if t.head_k is not None:
                raise ValueError("targets.head_k applies only to targets.type topk+sampled")
            slots = k
        else:
            if t.head_k is None:
                if k < 2:
                    raise ValueError(f"targets.type topk+sampled needs cache.k >= 2 (got {k})")
                t.head_k = k // 2
            if t.head_k >= k:
                raise ValueError(f"targets.head_k={t.head_k} must be smaller than cache.k={k}")
            slots = k - t.head_k
        if t.num_draws is None:
            t.num_draws = slots
        return self


