"""Samples: tokenized rows with stable sample IDs, for the whole dataset (:func:`load_samples`)
or window by window across ranks (:class:`SampleWindows`, stage 1's streaming input).

A :class:`Sample` is the record that crosses the stage boundary (DESIGN.md, Samples):
position ``t`` predicts token ``t+1`` and is a valid position iff ``loss_mask[t+1]``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from pipeline.config import DatasetConfig
from pipeline.data.generated import check_generated_tokenizer
from pipeline.data.formats import _chat_template, _encode_rows, fit_length, resolve_format, text_offsets, window_text
from pipeline.data.sources import load_rows
from pipeline.sample_ids import HashIndex, id_hashes, repeated_hashes


@dataclass(frozen=True)
class Sample:
    """One tokenized dataset row.

    Attributes:
        sample_id: unique string ID within a cache.
        input_ids: (T,) int32 token IDs, BOS included when the tokenizer adds one.
        loss_mask: (T,) bool, True for tokens trained on as targets.
        row: the dataset row it was tokenized from (-1: unknown); not compared.
        text: the text the tokens cover (``text`` format with ``with_offsets``), else None.
        offsets: (T, 2) int32 character span ``[start, end)`` of every token in ``text``
            (Python string indices: Unicode code points); zero-width for tokens the tokenizer
            adds (BOS, EOS); None without ``with_offsets``.
    """

    sample_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    row: int = field(default=-1, compare=False, repr=False)
    text: str | None = None
    offsets: np.ndarray | None = None

    @property
    def n_valid(self) -> int:
        """Number of valid positions (targets), ``loss_mask[1:].sum()``."""
        return int(self.loss_mask[1:].sum())


def tokenize_part(ds, tokenizer, cfg: DatasetConfig, start: int = 0,
                  fingerprint: str | None = None, with_offsets: bool = False) -> tuple[list[Sample], int]:
    """Tokenize the rows ``start, start+1, ...`` of a dataset held in ``ds`` (the whole dataset
    or a contiguous slice of it) into :class:`Sample` records, applying ``max_length`` /
    ``overflow``; no check across rows (see :func:`tokenize_rows`).

    Sample IDs come from ``cfg.id_field`` (a generated dataset: its ``id`` column) or are
    ``{fingerprint[:16]}-{row index}`` (``fingerprint``
    = the whole dataset's ``_fingerprint``, default ``ds._fingerprint``); with ``overflow: window``
    every sample's ID is ``{id}#{n}`` (window n = 0, 1, ...). Samples with no valid position (fewer
    than 2 tokens, or no target token: an empty text, a chat without assistant content) are
    skipped and counted. ``with_offsets`` (``text`` format only, a fast tokenizer) also keeps
    every sample's text and the character span of each of its tokens
    (:func:`~pipeline.data.formats.text_offsets`), which cross-tokenizer distillation needs.

    Returns:
        (samples in row order, n_skipped_empty)
    Raises:
        KeyError: a configured column missing from the dataset's columns.
        ValueError: a bad row (its file, global row index and sample ID are named), or a null ID;
            ``with_offsets`` with another format than ``text`` or a tokenizer without offsets.
    """
    fmt, chat_col = resolve_format(cfg, ds.column_names)
    id_field = cfg.id_field or ("id" if fmt == "generated" else None)  # generated rows: {prompt id}/{j}
    if id_field is not None:
        ids = [None if x is None else str(x) for x in ds[id_field][:]]
        if None in ids:
            raise ValueError(f"dataset {cfg.path} row {start + ids.index(None)}: id_field {id_field!r} is null")
    else:
        fp = (fingerprint or ds._fingerprint)[:16]
        ids = [f"{fp}-{start + i}" for i in range(len(ds))]
    if with_offsets:
        rows = text_offsets(ds, tokenizer, cfg, fmt, ids, start)
    else:
        rows = [(toks, mask, None, None) for toks, mask in _encode_rows(ds, tokenizer, cfg, fmt, chat_col, ids, start)]
    samples, skipped = [], 0
    for r, (sid, (toks, mask, text, offs)) in enumerate(zip(ids, rows), start):
        windows = fit_length(toks, mask, cfg, tokenizer.bos_token_id)
        if offs is not None:  # the token indices of each window: fit_length over 0..T-1 (BOS kept as index 0)
            bos = 0 if len(toks) and toks[0] == tokenizer.bos_token_id else None
            index = fit_length(np.arange(len(toks)), mask, cfg, bos)
        for n, (arr, m) in enumerate(windows):
            if len(arr) < 2 or not m[1:].any():
                skipped += 1
                continue
            sample_id = f"{sid}#{n}" if cfg.overflow == "window" else sid
            extra = window_text(text, offs[index[n][0]]) if offs is not None else ()
            samples.append(Sample(sample_id, arr, m, r, *extra))
    return samples, skipped


def check_unique(cfg: DatasetConfig, samples: list[Sample], seen: set[str]) -> None:
    """Add the samples' IDs to ``seen`` (a set of strings: for a dataset held whole; a stream
    uses :meth:`SampleWindows.check_unique`).

    Raises:
        ValueError: an ID already in ``seen`` or twice in ``samples`` (the ID is named).
    """
    for s in samples:
        if s.sample_id in seen:
            raise _duplicate(cfg, s.sample_id)
        seen.add(s.sample_id)


def _duplicate(cfg: DatasetConfig, sample_id: str) -> ValueError:
    return ValueError(f"dataset {cfg.path}: duplicate sample_id {sample_id!r}")


def tokenize_rows(ds, tokenizer, cfg: DatasetConfig) -> tuple[list[Sample], int]:
    """Tokenize every row of ``ds`` (plain text, chat or prompt/response, see
    :func:`resolve_format`): :func:`tokenize_part` over the whole dataset, then the checks
    across rows.

    Returns:
        (samples, n_skipped_empty)
    Raises:
        KeyError: a configured column missing from the dataset's columns.
        ValueError: a bad row (its file, row index and sample ID are named), duplicate sample
            IDs (the ID is named) or no usable sample at all.
    """
    samples, skipped = tokenize_part(ds, tokenizer, cfg)
    check_unique(cfg, samples, set())
    if not samples:
        raise _no_samples(cfg, ds)
    return samples, skipped


def _no_samples(cfg: DatasetConfig, ds) -> ValueError:
    return ValueError(f"dataset {cfg.path} (split {cfg.split}): no sample with a target token ({len(ds)} rows, "
                      f"format {resolve_format(cfg, ds.column_names)[0]})")


def _tokenization_fingerprint(ds, tokenizer, cfg: DatasetConfig) -> str:
    """The rows' fingerprint, mixed with every tokenization option that differs from its
    default (and the chat template in use), so a cache is not resumed with other samples."""
    keys = ("format", "text_field", "text_join", "messages_field", "chat_template", "prompt_field", "response_field",
            "overflow", "stride")
    opts = {k: getattr(cfg, k) for k in keys if getattr(cfg, k) != DatasetConfig.model_fields[k].default}
    if resolve_format(cfg, ds.column_names)[0] == "chat":
        opts["chat_template_sha256"] = hashlib.sha256(_chat_template(cfg, tokenizer).encode()).hexdigest()
    if not opts:
        return ds._fingerprint
    return hashlib.sha256((ds._fingerprint + json.dumps(opts, sort_keys=True)).encode()).hexdigest()[:16]


def load_samples(cfg: DatasetConfig, tokenizer) -> tuple[list[Sample], str, int]:
    """:func:`load_rows` then :func:`tokenize_rows` (a generated dataset's tokenizer checked first).

    Returns:
        (samples, dataset fingerprint (rows + non-default tokenization options), number of
        skipped empty samples)
    """
    ds = load_rows(cfg)
    if len(ds) == 0:
        raise ValueError(f"dataset {cfg.path} (split {cfg.split}) is empty")
    check_generated_tokenizer(cfg, tokenizer)
    samples, skipped = tokenize_rows(ds, tokenizer, cfg)
    return samples, _tokenization_fingerprint(ds, tokenizer, cfg), skipped


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Strided share of ``range(n)`` for ``rank``: every rank gets ``n // world_size`` or one more."""
    return list(range(rank, n, world_size))


TOKENIZE_ROWS = 256
"""Rows per tokenizer call in :class:`SampleWindows` (the tokenizer returns Python lists, about
36 bytes per token; samples keep numpy arrays, 5 bytes per token)."""


class SampleWindows:
    """The samples of a dataset, read and tokenized window by window, each rank tokenizing only
    its part of every window (stage 1's streaming input; DESIGN.md, Samples).

    The rows (a memory-mapped ``datasets.Dataset``, :func:`load_rows`) are cut into windows of
    ``window_rows`` consecutive rows; rank ``r`` of ``W`` tokenizes the contiguous part
    ``[a + n·r // W, a + n·(r+1) // W)`` of window ``[a, a + n)``, and one ``all_gather`` per
    window gives every rank the whole window's samples in row order. So a window's samples,
    and anything derived from them (stage 1's length-sorted batches), are the same at every
    world size, while host memory holds one window, not the dataset: peak RSS grows only by
    the duplicate check's 12 bytes per sample (:meth:`check_unique`).

    Iterating is collective: every rank must iterate in step (one gather per window).
    ``with_offsets``: the samples keep their text and token offsets (:func:`tokenize_part`).

    Attributes:
        num_rows: rows of the split (after ``num_samples``).
        fingerprint: the dataset fingerprint recorded in the cache manifest (rows + non-default
            tokenization options, :func:`load_samples`).
        skipped: empty samples skipped so far (all ranks' parts).
        num_samples: samples yielded so far.
    Raises (constructing):
        ValueError: a generated dataset written with another tokenizer (both fingerprints named,
            :func:`~pipeline.data.generated.check_generated_tokenizer`).
    Raises (while iterating, on every rank alike):
        KeyError, ValueError: as :func:`tokenize_part` (the rank that read the bad row names it;
            the others raise the same error), a duplicate sample ID (named), no usable sample in
            the whole dataset.
    """

    def __init__(self, cfg: DatasetConfig, tokenizer, window_rows: int, rank: int = 0, world_size: int = 1,
                 gather=None, with_offsets: bool = False):
        self.cfg, self.tokenizer, self.window_rows = cfg, tokenizer, window_rows
        self.with_offsets = with_offsets
        self.rank, self.world_size, self.gather = rank, world_size, gather
        self.ds = load_rows(cfg)
        if len(self.ds) == 0:
            raise ValueError(f"dataset {cfg.path} (split {cfg.split}) is empty")
        check_generated_tokenizer(cfg, tokenizer)  # stored token IDs: the same tokenizer or nothing
        self.num_rows = len(self.ds)
        self.fingerprint = _tokenization_fingerprint(self.ds, tokenizer, cfg)
        resolve_format(cfg, self.ds.column_names)  # a missing column fails before any teacher forward
        self.skipped = self.num_samples = 0
        self._seen = HashIndex(np.int32)  # every yielded sample's ID hash, located by its window number

    def _part(self, a: int, n: int):
        lo, hi = a + n * self.rank // self.world_size, a + n * (self.rank + 1) // self.world_size
        samples, skipped = [], 0
        try:  # TOKENIZE_ROWS at a time: the tokenizer's Python lists exist for those rows only
            for a in range(lo, hi, TOKENIZE_ROWS):
                got, n = tokenize_part(self.ds.select(range(a, min(a + TOKENIZE_ROWS, hi))), self.tokenizer, self.cfg,
                                       a, self.ds._fingerprint, with_offsets=self.with_offsets)
                samples += got
                skipped += n
        except (KeyError, ValueError) as e:
            return e
        return samples, skipped

    def _window_ids(self, w: int) -> set[str]:
        """The sample IDs of window ``w``, tokenized again here (all its rows): the collision-safe
        check of a hash hit, so only for a duplicate or a 64-bit hash collision."""
        a = w * self.window_rows
        hi = min(a + self.window_rows, self.num_rows)
        out: set[str] = set()
        for b in range(a, hi, TOKENIZE_ROWS):
            got, _ = tokenize_part(self.ds.select(range(b, min(b + TOKENIZE_ROWS, hi))), self.tokenizer, self.cfg, b,
                                   self.ds._fingerprint)
            out.update(s.sample_id for s in got)
        return out

    def check_unique(self, samples: list[Sample], w: int) -> None:
        """Check the IDs of window ``w``'s samples against each other and every earlier window,
        then remember them: 12 bytes per sample (a 64-bit ID hash and the window number,
        :class:`~pipeline.sample_ids.HashIndex`), not the ID strings. A hash hit is confirmed against
        the IDs (the earlier window's rows tokenized again) before it is called a duplicate.

        Raises:
            ValueError: a duplicate sample ID (the ID and the dataset file named).
        """
        ids = [s.sample_id for s in samples]
        hashes = id_hashes(ids)
        seen: dict[str, int] = {}
        for i in repeated_hashes(hashes).tolist():  # equal hashes within the window: compare the strings
            if ids[i] in seen:
                raise _duplicate(self.cfg, ids[i])
            seen[ids[i]] = i
        pos, loc = self._seen.candidates(hashes)
        for prev in np.unique(loc).tolist():
            earlier = self._window_ids(prev)
            for p in pos[loc == prev].tolist():
                if ids[p] in earlier:
                    raise _duplicate(self.cfg, ids[p])
        self._seen.add(hashes, np.full(len(hashes), w))

    def __iter__(self) -> Iterator[tuple[int, list[Sample]]]:
        """Yields ``(rows in the window, the window's samples in row order)``, window by window."""
        for a in range(0, self.num_rows, self.window_rows):
            n = min(self.window_rows, self.num_rows - a)
            part = self._part(a, n)
            parts = self.gather(part) if self.world_size > 1 else [part]
            for p in parts:
                if isinstance(p, BaseException):
                    raise p
            samples = [s for p in parts for s in p[0]]
            self.skipped += sum(p[1] for p in parts)
            self.check_unique(samples, a // self.window_rows)
            self.num_samples += len(samples)
            yield n, samples
        if not self.num_samples:
            raise _no_samples(self.cfg, self.ds)
