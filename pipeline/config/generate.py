"""Configuration of ``generate-completions``: sample completions of a prompt dataset from a
model (a teacher: sequence-level KD data; a student: on-policy data)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from pipeline.config.data import DatasetConfig
from pipeline.config.loading import (StorageOptions, _apply_storage_options, _file_url_to_path, _local_only,
                                     _Section)


class SamplingConfig(_Section):
    """How each completion is drawn, token by token, from the model's next-token distribution."""

    num_completions: int = Field(default=1, ge=1)
    """Completions per prompt; row ``j`` of prompt ``P`` has the ID ``P/j``."""
    max_new_tokens: int = Field(default=128, ge=1)
    """Most tokens per completion (the stop token included); a completion cut here has
    ``finish_reason: length``."""
    temperature: float = Field(default=1.0, ge=0)
    """Softmax temperature of the logits; 0 is greedy decoding (the arg-max, no draw)."""
    top_k: int = Field(default=0, ge=0)
    """Keep only the ``top_k`` most likely tokens before the draw (0: all)."""
    top_p: float = Field(default=1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    ``top_p`` (after ``temperature`` and ``top_k``; 1: all)."""
    seed: int = 0
    """Completion ``j`` of prompt ``P`` draws from its own generator seeded from
    ``(seed, P, j)``: reruns, resumed runs and any world size give the same tokens."""
    stop_token_ids: list[int] = Field(default_factory=list)
    """Token IDs that end a completion besides the tokenizer's EOS and the model's
    ``generation_config.eos_token_id`` (e.g. a chat template's end-of-turn token). The stop
    token is kept as the completion's last token (``finish_reason: eos``)."""


class GenerateConfig(_Section):
    """``generate-completions``: sample completions of a prompt dataset from a model and write
    them as a dataset that ``precompute-teacher`` reads as is."""

    storage_options: StorageOptions = Field(default_factory=dict)
    """Options of the file systems of URLs in this config (see :data:`StorageOptions`)."""
    _storage = field_validator("storage_options")(_apply_storage_options)
    model: str
    """Local Hugging Face model directory that generates (a teacher, or a student's ``final/``)."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to ``model``."""
    _local_paths = field_validator("model", "tokenizer")(_local_only)
    dataset: DatasetConfig
    """The prompts: chat rows are cut before their last assistant message and rendered with the
    generation prompt; prompt/response rows give their prompt; text rows their first
    ``prompt_tokens`` tokens. A prompt longer than ``dataset.max_length`` tokens is skipped
    and counted."""
    prompt_tokens: int = Field(default=32, ge=1)
    """Text rows: the prompt is the row's first ``prompt_tokens`` tokens (BOS included)."""
    output_dir: str
    """The generated dataset (a local directory or a store URL): ``generation.json`` and
    parquet shards. A rerun resumes it; a non-empty directory that is not a generated dataset
    is refused."""
    _file_out = field_validator("output_dir")(_file_url_to_path)
    overwrite: bool = False
    """Delete a generated dataset already in ``output_dir`` (of another model or sampling)
    instead of refusing it."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    batch_size: int = Field(default=8, ge=1)
    """Prompts per batch (``batch_size × num_completions`` sequences per forward). Global batch
    ``b`` holds the prompts of rows ``[b·batch_size, (b+1)·batch_size)`` and runs on rank
    ``b % world_size``, so a batch's composition does not depend on the world size."""
    rows_per_shard: int = Field(default=1024, ge=1)
    """A rank closes its shard (one parquet file) once it holds this many rows (whole batches)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Model parameters and activations: ``auto`` is bfloat16 on a GPU, float32 on a CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
