"""Micro-batches: collation of cache records (or samples) into padded or packed rows, and the
flattened targets of their valid positions. Used by stage 1 (teacher forward) and stage 2 (the
student step).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.numerics import position_stats


@dataclass
class LossTargets:
    """The targets of the valid positions of one micro-batch, flattened sample-major.

    Attributes:
        labels: (N,) int64 next-token ids ``y_t``.
        sample_index: (N,) int64 index in ``[0, n_samples)`` of each position's sample.
        n_samples: S, the number of samples (loss-log rows) of the micro-batch.
        topk_ids: (N, k) int64 teacher support, or None (CE only).
        topk_logprobs: (N, k) float32 teacher log-probabilities at the cache temperature (for
            sampled caches, log estimated probabilities); ``-inf`` marks a padding slot.
        tail_logprob: (N,) float32 teacher log tail mass (``-inf`` allowed).
        aligned: (N,) bool, cross-tokenizer batches only: the position has teacher targets
            (pipeline/student/cross_tokenizer.py); None otherwise.
        mapped: (N, k) bool, cross-tokenizer batches only: the slot's teacher id has a student id.
    """

    labels: torch.Tensor
    sample_index: torch.Tensor
    n_samples: int
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tail_logprob: torch.Tensor | None = None
    aligned: torch.Tensor | None = None
    mapped: torch.Tensor | None = None


@dataclass
class Batch:
    """A micro-batch: rows of token ids for the forward pass, and the targets of its valid
    positions flattened sample-major (the layout of :class:`pipeline.student.losses.LossTargets`).

    Unpacked, row ``i`` holds sample ``i`` right-padded (causal attention makes the padding
    harmless). Packed (:func:`collate` with ``pack_length``), a row holds several samples back
    to back, each with position ids restarting at 0 (Hugging Face attention confines each
    query to its own sample when ``position_ids`` mark packed sequences); targets never cross
    a sample boundary. The valid positions, their order and their targets are the same either
    way, so the loss, its gradient and the per-sample sums are those of the unpacked batch.

    Attributes:
        sample_ids: S IDs; ``None`` marks a padding sample (no valid position, not logged).
        input_ids: (R, L) int64 token ids (R = S unpacked).
        rows: (N,) int64 flat index ``r * L + t`` of each valid position in ``input_ids``.
        labels: (N,) int64 next-token ids. sample_index: (N,) int64 sample of each position.
        n_tokens: (S,) int64 valid positions per sample (host).
        position_ids: (R, L) int64 for packed rows, else None.
        topk_ids: (N, k) int64, topk_logprobs: (N, k) float32, tail_logprob: (N,) float32 teacher
            targets of the valid positions, or None (CE-only data).
        topk_mass_sum, teacher_entropy_sum: (S,) float64 per-sample sums over valid positions of
            the teacher mass on the stored ids and the teacher entropy in nats, both as
            :func:`pipeline.numerics.position_stats` defines them (host), or None.
        segments: packed rows only: per row, the ``(start, end)`` token ranges of its samples and
            trailing padding, covering ``[0, L)`` (host; for ``pipeline.student.packed_attention``).
        aligned: (N,) bool, mapped: (N, k) bool: cross-tokenizer records only (positions with
            teacher targets; slots whose teacher id has a student id), else None.
        aligned_count: (S,) int64 aligned positions per sample, mapped_mass_sum: (S,) float64
            per-sample sum over aligned positions of the teacher probability (cache
            temperature) on mapped ids (host); cross-tokenizer records only, else None.
    """

    sample_ids: list[str | None]
    input_ids: torch.Tensor
    rows: torch.Tensor
    labels: torch.Tensor
    sample_index: torch.Tensor
    n_tokens: torch.Tensor
    position_ids: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    tail_logprob: torch.Tensor | None = None
    topk_mass_sum: torch.Tensor | None = None
    teacher_entropy_sum: torch.Tensor | None = None
    segments: list[list[tuple[int, int]]] | None = None
    aligned: torch.Tensor | None = None
    mapped: torch.Tensor | None = None
    aligned_count: torch.Tensor | None = None
    mapped_mass_sum: torch.Tensor | None = None

    _DEVICE_FIELDS = ("input_ids", "rows", "labels", "sample_index", "position_ids", "topk_ids", "topk_logprobs",
                      "tail_logprob", "aligned", "mapped")

    def to(self, device: torch.device) -> "Batch":
        """The batch with the tensors the forward/loss use on ``device`` (host statistics stay).

        Called once per micro-batch, before its forward (the trainer moves every micro-batch
        of a step up front), so the teacher targets cross to the device once. The copies are
        ``non_blocking``: from pinned memory (:meth:`pin_memory`) a host-to-GPU copy is queued
        on the stream and the host goes on; from pageable memory CUDA copies through a staging
        buffer first (still correct); on the same device (CPU to CPU) ``Tensor.to`` returns
        the tensor itself, no copy.
        """
        moved = {f: None if getattr(self, f) is None else getattr(self, f).to(device, non_blocking=True)
                 for f in self._DEVICE_FIELDS}
        return dataclasses.replace(self, **moved)

    def pin_memory(self) -> "Batch":
        """The batch with the tensors :meth:`to` moves in page-locked host memory (a copy each),
        so their copies to a GPU are asynchronous; host statistics stay. For a loader thread
        ahead of a CUDA trainer (:class:`pipeline.student.sampler.StepPrefetcher`).

        Raises:
            RuntimeError: no CUDA device (torch pins memory for an accelerator only).
        """
        pinned = {f: None if getattr(self, f) is None else getattr(self, f).pin_memory()
                  for f in self._DEVICE_FIELDS}
        return dataclasses.replace(self, **pinned)

    @property
    def n_valid(self) -> int:
        """Valid positions N (known on the host: no device synchronisation)."""
        return int(self.n_tokens.sum())

    def targets(self) -> LossTargets:
        return LossTargets(self.labels, self.sample_index, len(self.sample_ids), self.topk_ids, self.topk_logprobs,
                           self.tail_logprob, self.aligned, self.mapped)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing packing of samples into rows of at most ``capacity`` tokens.

    Args:
        lengths: tokens per sample. capacity: tokens per row (raised to the longest sample).
    Returns:
        Rows as lists of sample indices; within a row, samples keep their batch order.
        Deterministic (ties broken by index).
    """
    capacity = max([capacity, *lengths])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        r = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if r is None:
            rows.append([])
            free.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
    return [sorted(r) for r in rows]


def collate(records: list, pad_only: bool = False, pack_length: int | None = None) -> Batch:
    """Records (cache records or plain samples) into a :class:`Batch`.

    Args:
        records: objects with ``sample_id``, ``input_ids`` (T,), ``loss_mask`` (T,) and, for
            cache records, ``topk_ids`` (T-1, k), ``topk_logprobs``, ``tail_logprob``.
        pad_only: mark every sample as padding (no valid position); used so that all ranks
            make the same number of forward calls (PLATFORM.md trap 4).
        pack_length: pack samples into rows of this many tokens (:func:`pack_rows`); None:
            one right-padded row per sample.
    """
    S = len(records)
    lengths = [len(r.input_ids) for r in records]
    layout = pack_rows(lengths, pack_length) if pack_length else [[i] for i in range(S)]
    L = max(sum(lengths[i] for i in row) for row in layout)
    ids = np.zeros((len(layout), L), dtype=np.int64)
    pos = np.zeros((len(layout), L), dtype=np.int64) if pack_length else None
    start = np.zeros(S, dtype=np.int64)  # flat index of each sample's first token
    segments: list[list[tuple[int, int]]] | None = [] if pack_length else None
    for r, row in enumerate(layout):
        off = 0
        segs = []
        for i in row:
            n = lengths[i]
            ids[r, off: off + n] = records[i].input_ids
            if pos is not None:
                pos[r, off: off + n] = np.arange(n)
            start[i] = r * L + off
            segs.append((off, off + n))
            off += n
        if pos is not None:
            pos[r, off:] = np.arange(L - off)  # trailing padding: a sequence of its own
            segments.append(segs + ([(off, L)] if off < L else []))
    if pad_only:
        t_sel = [np.zeros(0, dtype=np.int64) for _ in records]
    else:
        t_sel = [np.flatnonzero(np.asarray(r.loss_mask[1:], dtype=bool)) for r in records]
    counts = np.array([len(t) for t in t_sel], dtype=np.int64)
    flat_t = np.concatenate(t_sel) if S else np.zeros(0, dtype=np.int64)
    sample_index = np.repeat(np.arange(S, dtype=np.int64), counts)
    rows = start[sample_index] + flat_t
    labels = ids.reshape(-1)[rows + 1]
    sids = [None if pad_only else r.sample_id for r in records]
    batch = Batch(sids, torch.from_numpy(ids), torch.from_numpy(rows), torch.from_numpy(labels),
                  torch.from_numpy(sample_index), torch.from_numpy(counts),
                  None if pos is None else torch.from_numpy(pos), segments=segments)
    if not hasattr(records[0], "topk_ids"):
        return batch
    tk_ids = np.concatenate([r.topk_ids[t] for r, t in zip(records, t_sel)]).astype(np.int64)
    tk_lp = np.concatenate([r.topk_logprobs[t] for r, t in zip(records, t_sel)]).astype(np.float32, copy=False)
    tail = np.concatenate([r.tail_logprob[t] for r, t in zip(records, t_sel)]).astype(np.float32, copy=False)
    mass, entropy = position_stats(tk_lp, tail)
    mass, entropy = np.bincount(sample_index, mass, minlength=S), np.bincount(sample_index, entropy, minlength=S)
    batch = dataclasses.replace(batch, topk_ids=torch.from_numpy(tk_ids), topk_logprobs=torch.from_numpy(tk_lp),
                                tail_logprob=torch.from_numpy(tail), topk_mass_sum=torch.from_numpy(mass),
                                teacher_entropy_sum=torch.from_numpy(entropy))
    if not hasattr(records[0], "aligned"):
        return batch
    return _cross_tokenizer_fields(batch, records, t_sel, sample_index, tk_lp, S)


def _cross_tokenizer_fields(batch: Batch, records: list, t_sel: list, sample_index: np.ndarray, tk_lp: np.ndarray,
                            S: int) -> Batch:
    """Add the ``aligned`` / ``mapped`` targets of cross-tokenizer records and their per-sample
    statistics (aligned positions; teacher mass on mapped ids, at the cache temperature)."""
    aligned = np.concatenate([r.aligned[t] for r, t in zip(records, t_sel)]).astype(bool)
    mapped = np.concatenate([r.mapped[t] for r, t in zip(records, t_sel)]).astype(bool)
    mass = np.where(mapped, np.exp(tk_lp.astype(np.float64)), 0.0).sum(1)
    return dataclasses.replace(batch, aligned=torch.from_numpy(aligned), mapped=torch.from_numpy(mapped),
                               aligned_count=torch.from_numpy(np.bincount(sample_index, aligned, minlength=S)
                                                              .astype(np.int64)),
                               mapped_mass_sum=torch.from_numpy(np.bincount(sample_index, mass, minlength=S)))
