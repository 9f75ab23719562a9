"""Samples: loading rows with ``datasets``, tokenizing, stable sample IDs.

A :class:`Sample` is the record that crosses the stage boundary (DESIGN.md, Samples):
position ``t`` predicts token ``t+1`` and is a valid position iff ``loss_mask[t+1]``.

Layout (this module only re-exports):

- :mod:`pipeline.data.sources`: a dataset's raw rows (:func:`load_rows`: ``save_to_disk``
  directories, json/jsonl/parquet/txt/csv files, local or on a store, hub names) and the
  one-line errors for unreadable files.
- :mod:`pipeline.data.formats`: one row → token IDs and loss mask (:func:`resolve_format`,
  :func:`render_chat`, :func:`fit_length`).
- :mod:`pipeline.data.samples`: :class:`Sample`, tokenization into samples with stable IDs
  (:func:`tokenize_part`, :func:`tokenize_rows`, :func:`load_samples`) and stage 1's windowed
  input (:class:`SampleWindows`). ``tokenize_part`` and ``TOKENIZE_ROWS`` are looked up there
  by :class:`SampleWindows`: patch them in :mod:`pipeline.data.samples`.
- :mod:`pipeline.data.stream`: :class:`DatasetSamples`, a dataset's samples by index in
  bounded memory (stage 2's source for ``data.train_dataset``): one streaming pass, then each
  sample tokenized again from its row when read.
- :mod:`pipeline.data.generated`: the contract of generated datasets (``generate-completions``
  output: ``generation.json`` + parquet shards of token IDs), read as is by :func:`load_rows`.
- :mod:`pipeline.data.batch`: collation into padded or packed micro-batches (both stages).
"""
from __future__ import annotations

from pipeline.data.formats import ROLE_ALIASES, fit_length, render_chat, resolve_format
from pipeline.data.samples import (TOKENIZE_ROWS, Sample, SampleWindows, check_unique, load_samples, shard_indices,
                                   tokenize_part, tokenize_rows)
from pipeline.data.sources import load_rows
from pipeline.data.stream import DatasetSamples

__all__ = ["DatasetSamples", "ROLE_ALIASES", "Sample", "SampleWindows", "TOKENIZE_ROWS", "check_unique", "fit_length", "load_rows",
           "load_samples", "render_chat", "resolve_format", "shard_indices", "tokenize_part", "tokenize_rows"]
