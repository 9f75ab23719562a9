"""Samples: loading rows with ``datasets``, tokenizing, stable sample IDs.

A :class:`Sample` is the record that crosses the stage boundary (DESIGN.md, Samples):
position ``t`` predicts token ``t+1`` and is a valid position iff ``loss_mask[t+1]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import DatasetConfig


@dataclass(frozen=True)
class Sample:
    """One tokenized dataset row.

    Attributes:
        sample_id: unique string ID within a cache.
        input_ids: (T,) int32 token IDs, BOS included when the tokenizer adds one.
        loss_mask: (T,) bool, True for tokens trained on as targets.
    """

    sample_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray

    @property
    def n_valid(self) -> int:
        """Number of valid positions (targets), ``loss_mask[1:].sum()``."""
        return int(self.loss_mask[1:].sum())


def load_rows(cfg: DatasetConfig):
    """The rows of ``cfg.split`` as a ``datasets.Dataset`` (first ``num_samples`` if set).

    ``cfg.path`` may be a ``save_to_disk`` directory (Dataset or DatasetDict), a local
    json/jsonl/parquet/txt/csv file or a directory of such files, or a hub name.

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        KeyError: the split is not in the dataset.
    """
    import datasets

    p = Path(cfg.path)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise KeyError(f"dataset {p} has no split {cfg.split!r} (has {sorted(ds)})")
            ds = ds[cfg.split]
    elif p.exists():
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
        ext = files[0].suffix.lstrip(".") if files else ""
        builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "txt": "text", "csv": "csv"}.get(ext)
        if builder is None:
            raise ValueError(f"dataset {p}: cannot tell the format of {files[:1]} (json, jsonl, parquet, txt, csv)")
        kwargs = {"sample_by": cfg.sample_by} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    elif cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") > 1:
        raise FileNotFoundError(f"dataset path not found: {cfg.path}")
    else:
        ds = datasets.load_dataset(cfg.path, split=cfg.split)
    if cfg.num_samples is not None:
        ds = ds.select(range(min(cfg.num_samples, len(ds))))
    return ds


def tokenize_rows(ds, tokenizer, cfg: DatasetConfig) -> tuple[list[Sample], int]:
    """Tokenize plain-text rows into :class:`Sample` records.

    Sample IDs come from ``cfg.id_field`` or are ``{dataset fingerprint[:16]}-{row index}``.
    Samples with fewer than 2 tokens (nothing to predict) are skipped and counted.

    Returns:
        (samples, n_skipped_empty)
    Raises:
        KeyError: ``text_field`` / ``id_field`` missing from the dataset's columns.
        ValueError: duplicate sample IDs (the ID is named) or no usable sample at all.
    """
    for field in (cfg.text_field, cfg.id_field):
        if field is not None and field not in ds.column_names:
            raise KeyError(f"dataset {cfg.path}: no column {field!r} (columns: {ds.column_names})")
    texts = ds[cfg.text_field][:]  # a list (datasets >= 4 returns a lazy Column)
    if cfg.id_field is not None:
        ids = [str(x) for x in ds[cfg.id_field][:]]
    else:
        ids = [f"{ds._fingerprint[:16]}-{i}" for i in range(len(ds))]
    enc = tokenizer(texts, truncation=True, max_length=cfg.max_length, add_special_tokens=True)["input_ids"]
    samples, seen, skipped = [], set(), 0
    for sid, toks in zip(ids, enc):
        if sid in seen:
            raise ValueError(f"dataset {cfg.path}: duplicate sample_id {sid!r}")
        seen.add(sid)
        if len(toks) < 2:
            skipped += 1
            continue
        arr = np.asarray(toks, dtype=np.int32)
        samples.append(Sample(sid, arr, np.ones(len(arr), dtype=bool)))
    if not samples:
        raise ValueError(f"dataset {cfg.path} (split {cfg.split}): no sample with at least 2 tokens ({len(ids)} rows)")
    return samples, skipped


def load_samples(cfg: DatasetConfig, tokenizer) -> tuple[list[Sample], str, int]:
    """:func:`load_rows` then :func:`tokenize_rows`.

    Returns:
        (samples, dataset fingerprint, number of skipped empty rows)
    """
    ds = load_rows(cfg)
    if len(ds) == 0:
        raise ValueError(f"dataset {cfg.path} (split {cfg.split}) is empty")
    samples, skipped = tokenize_rows(ds, tokenizer, cfg)
    return samples, ds._fingerprint, skipped


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Strided share of ``range(n)`` for ``rank``: every rank gets ``n // world_size`` or one more."""
    return list(range(rank, n, world_size))
