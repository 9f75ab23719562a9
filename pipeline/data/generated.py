"""Generated datasets: the on-disk contract between ``generate-completions`` (or any other engine,
e.g. ``scripts/vllm_generate.py``) and stage 1, which reads such a directory as is.

A generated dataset is a directory (local or a store prefix) holding ``generation.json``
(:data:`MANIFEST`) and parquet shards with the columns of :data:`COLUMNS`, one row per
completion. Stage 1 scores ``prompt_ids + completion_ids`` without tokenizing anything; the
completion tokens are the targets; the sample ID is the row's ``id`` (``{prompt id}/{j}``).
The page ``docs/guide/generation.md`` documents the columns and the manifest's keys.
"""
from __future__ import annotations

import json

from pipeline.config import DatasetConfig
from pipeline.storage import Folder

MANIFEST = "generation.json"
"""The manifest's file name; its presence marks a directory as a generated dataset."""

FORMAT = "kd-pipeline/generated-completions"
"""The manifest's ``format`` value."""

FORMAT_VERSION = 1
"""The manifest's ``format_version``; readers refuse another."""

COLUMNS = {"id": "string", "prompt_id": "string", "prompt_ids": "list<int32>", "completion_ids": "list<int32>",
           "prompt": "string", "completion": "string", "finish_reason": "string"}
"""Columns of every shard and their Arrow types. ``id`` = ``{prompt_id}/{j}`` (unique);
``prompt_ids`` the prompt's token IDs as the model saw them (BOS and chat markup included);
``completion_ids`` the sampled tokens (the stop token last when ``finish_reason`` is ``eos``);
``prompt``/``completion`` their text (informational: stage 1 reads only the IDs);
``finish_reason`` ``eos`` (a stop token was sampled) or ``length`` (``max_new_tokens``)."""


def arrow_schema():
    """The ``pyarrow.Schema`` of :data:`COLUMNS`, in that order."""
    import pyarrow as pa

    types = {"string": pa.string(), "list<int32>": pa.list_(pa.int32())}
    return pa.schema([(name, types[t]) for name, t in COLUMNS.items()])


def read_generation_manifest(path: str) -> dict | None:
    """The ``generation.json`` of the dataset at ``path`` as a dict, or None when ``path`` is
    not a generated dataset (no such file; a hub name or a plain file).

    Raises:
        ValueError: the manifest is not a JSON object of this format and version (named).
    """
    try:
        folder = Folder(path)
        if not folder.isfile(MANIFEST):
            return None
        raw = folder.read_bytes(MANIFEST)
    except (OSError, ValueError):
        return None
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"dataset {folder.join(MANIFEST)}: invalid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"dataset {folder.join(MANIFEST)}: not a generated-completions manifest "
                         f"(format {m.get('format') if isinstance(m, dict) else None!r}, expected {FORMAT!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"dataset {folder.join(MANIFEST)}: format_version {m.get('format_version')!r}, this reader "
                         f"reads {FORMAT_VERSION}")
    return m


def generated_files(cfg: DatasetConfig, manifest: dict | None) -> list[str]:
    """The shard paths (local paths or URLs) of the complete generated dataset at ``cfg.path``,
    in the manifest's order.

    Raises:
        FileNotFoundError: ``dataset.format: generated`` without a ``generation.json``.
        ValueError: the dataset is not complete (its generation stopped or still runs).
    """
    if manifest is None:
        raise FileNotFoundError(f"dataset {cfg.path}: format generated, but there is no {MANIFEST} "
                                "(write it with generate-completions)")
    if not manifest.get("complete"):
        raise ValueError(f"dataset {cfg.path}: the generated dataset is not complete ({MANIFEST} says complete: "
                         "false); rerun generate-completions with the same config to finish it")
    folder = Folder(cfg.path)
    return [str(folder.join(s["file"])) for s in manifest.get("shards", [])]


def check_generated_tokenizer(cfg: DatasetConfig, tokenizer) -> None:
    """Refuse a generated dataset whose tokens come from another tokenizer than ``tokenizer``
    (the one that will read them); no-op for any other dataset.

    Raises:
        ValueError: the fingerprints differ (both named, with the dataset and the generating model).
    """
    m = read_generation_manifest(cfg.path)
    if m is None:
        return
    from pipeline.models import tokenizer_fingerprint

    mine, theirs = tokenizer_fingerprint(tokenizer), m.get("tokenizer_fingerprint")
    if mine != theirs:
        raise ValueError(f"dataset {cfg.path}: generated with a tokenizer of fingerprint {theirs} (model "
                         f"{m.get('model', {}).get('path')}), but this stage's tokenizer has fingerprint {mine}; "
                         "the stored token IDs would mean other text")
