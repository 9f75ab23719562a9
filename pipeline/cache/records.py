"""The cache's records in memory: one sample's teacher targets (:class:`CacheRecord`), a block
of consecutive samples as flat arrays (:class:`Block`), and the vectorised validation of their
targets (:func:`check_block`) that the writer applies before a shard is written and the reader
after a block is decoded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class CacheRecord:
    """Teacher targets of one sample (T tokens, T-1 positions).

    Attributes:
        sample_id: unique string ID.
        input_ids: (T,) int32 tokens.
        loss_mask: (T,) bool; position t is valid iff ``loss_mask[t+1]``.
        topk_ids: (T-1, k) int32 token IDs, descending probability; padding slots id 0.
        topk_logprobs: (T-1, k) float32 teacher log-probabilities (or, for sampled targets, log
            of the estimated probability), sorted descending; padding slots ``-inf``.
        tail_logprob: (T-1,) float32 log of the teacher mass outside the stored ids.
        teacher_nll_sum: teacher's summed negative log-likelihood of the actual next tokens
            over the valid positions (nats).
        text: the text the tokens cover, or None (a cache without ``text_offsets``).
        offsets: (T, 2) int32 character span ``[start, end)`` of every token in ``text``
            (zero-width for tokens the tokenizer adds), or None.
    """

    sample_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logprob: np.ndarray
    teacher_nll_sum: float
    text: str | None = None
    offsets: np.ndarray | None = None

    @property
    def n_valid(self) -> int:
        """Valid target positions of the sample (``loss_mask[1:]`` set)."""
        return int(self.loss_mask[1:].sum())


@dataclass
class Block:
    """Decoded targets of consecutive samples (flat token-major arrays plus offsets).

    Attributes:
        sample_ids: n IDs. tok_off / pos_off: (n+1,) int64 offsets into the token arrays
        (``input_ids``, ``loss_mask``) and the position arrays (``topk_ids`` (P, k),
        ``topk_logprobs`` (P, k), ``tail_logprob`` (P,)). teacher_nll_sum: (n,) float64.
        texts: n strings and offsets: (T_total, 2) int32 token spans, or both None (a cache
        without ``text_offsets``).
    """

    sample_ids: list[str]
    tok_off: np.ndarray
    pos_off: np.ndarray
    input_ids: np.ndarray
    loss_mask: np.ndarray
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    tail_logprob: np.ndarray
    teacher_nll_sum: np.ndarray
    texts: list[str] | None = None
    offsets: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the block's arrays (tokens, mask, targets; offsets and text when stored)."""
        extra = 0 if self.offsets is None else self.offsets.nbytes + sum(len(t) for t in self.texts)
        return extra + sum(a.nbytes for a in (self.input_ids, self.loss_mask, self.topk_ids, self.topk_logprobs,
                                              self.tail_logprob))

    def record(self, j: int) -> CacheRecord:
        """The ``j``-th sample of the block (views, no copy)."""
        a, b = self.tok_off[j], self.tok_off[j + 1]
        p, q = self.pos_off[j], self.pos_off[j + 1]
        text = (self.texts[j], self.offsets[a:b]) if self.offsets is not None else ()
        return CacheRecord(self.sample_ids[j], self.input_ids[a:b], self.loss_mask[a:b], self.topk_ids[p:q],
                           self.topk_logprobs[p:q], self.tail_logprob[p:q], float(self.teacher_nll_sum[j]), *text)

    @staticmethod
    def from_records(records: list[CacheRecord]) -> "Block":
        """Concatenate ``records`` into one block (offsets per sample). Text and token offsets are
        kept when every record has them.

        Raises:
            ValueError: some records have text offsets and others not (the first such sample named).
        """
        n_tok = np.array([len(r.input_ids) for r in records], dtype=np.int64)
        cat = np.concatenate
        has_text = [r.offsets is not None for r in records]
        if any(has_text) and not all(has_text):
            bad = records[has_text.index(not has_text[0])].sample_id
            raise ValueError(f"sample_id {bad!r}: text offsets stored for some samples of a block and not others")
        text = ([r.text for r in records], cat([r.offsets for r in records]).astype(np.int32)) if all(has_text) and records \
            else (None, None)
        return Block([r.sample_id for r in records], np.concatenate([[0], np.cumsum(n_tok)]),
                     np.concatenate([[0], np.cumsum(n_tok - 1)]), cat([r.input_ids for r in records]),
                     cat([r.loss_mask for r in records]).astype(bool), cat([r.topk_ids for r in records]),
                     cat([r.topk_logprobs for r in records]), cat([r.tail_logprob for r in records]),
                     np.array([r.teacher_nll_sum for r in records], dtype=np.float64), *text)


def check_block(b: Block, vocab_size: int, k: int, allow_padding: bool, mass_tol: float = 1e-2,
                value_tol: float = 1e-4) -> tuple[int, str] | None:
    """Vectorised record checks; returns (sample index in the block, problem) for the first bad
    sample, or None.

    Checks: T-1 positions per T tokens, (P, k) target shapes, token and target ids within
    ``[0, vocab_size)``, values not NaN, finite except trailing ``-inf`` padding (only when
    ``allow_padding``), ``<= value_tol``, sorted descending, probability mass ``<= 1 + mass_tol``,
    tail log-mass not NaN and ``<= value_tol``; stored token offsets (T, 2) with
    ``0 <= start <= end <= len(text)``.
    """
    if len(b.input_ids) != b.tok_off[-1] or len(b.loss_mask) != b.tok_off[-1]:
        return 0, f"{len(b.input_ids)} tokens stored, lengths say {int(b.tok_off[-1])}"
    if np.any(np.diff(b.tok_off) < 2):
        return int(np.argmax(np.diff(b.tok_off) < 2)), "fewer than 2 tokens"
    if b.topk_ids.shape != (b.pos_off[-1], k) or b.topk_logprobs.shape != (b.pos_off[-1], k) \
            or b.tail_logprob.shape != (b.pos_off[-1],):
        return 0, (f"targets of shape {b.topk_logprobs.shape} do not match {int(b.pos_off[-1])} positions "
                   f"(tokens - 1 per sample) × k={k}")
    def owner(offsets: np.ndarray, index: int) -> int:
        return int(np.searchsorted(offsets, index, side="right") - 1)

    bad = (b.input_ids < 0) | (b.input_ids >= vocab_size)
    if bad.any():
        return owner(b.tok_off, int(np.argmax(bad))), f"input_ids outside the vocabulary [0, {vocab_size})"
    v = b.topk_logprobs.astype(np.float32, copy=False)
    ids = b.topk_ids
    pad = np.isneginf(v)
    with np.errstate(invalid="ignore", over="ignore"):
        steps = np.diff(v, axis=1)  # -inf after -inf is NaN: not > 0
        lse = np.log(np.exp(v).sum(1, dtype=np.float64))
    checks = [
        ((((ids < 0) | (ids >= vocab_size)) & ~pad).any(1), f"topk_ids outside the vocabulary [0, {vocab_size})"),
        ((np.isnan(v) | np.isposinf(v)).any(1), "topk_logprobs not finite (NaN or +inf)"),
        (pad.any(1) if not allow_padding else pad.all(1), "topk_logprobs -inf" if not allow_padding
         else "every slot is padding (-inf)"),
        ((v > value_tol).any(1), f"topk_logprobs > 0 (tolerance {value_tol})"),
        ((steps > 0).any(1), "topk_logprobs not sorted descending (or padding before a real slot)"),
        (lse > np.log1p(mass_tol), f"probability mass of the stored slots > 1 + {mass_tol}"),
        (np.isnan(b.tail_logprob) | (b.tail_logprob > value_tol), "tail_logprob NaN or > 0"),
    ]
    for mask, what in checks:
        if mask.any():
            return owner(b.pos_off, int(np.argmax(mask))), what
    if b.offsets is not None:
        if b.offsets.shape != (len(b.input_ids), 2) or len(b.texts) != len(b.sample_ids):
            return 0, f"token offsets of shape {b.offsets.shape} do not match {len(b.input_ids)} tokens"
        lens = np.repeat(np.array([len(t) for t in b.texts], dtype=np.int64), np.diff(b.tok_off))
        o = b.offsets
        bad = (o[:, 0] < 0) | (o[:, 1] < o[:, 0]) | (o[:, 1] > lens)
        if bad.any():
            return owner(b.tok_off, int(np.argmax(bad))), "token offsets outside the sample's text"
    return None


def record_nbytes(r: CacheRecord) -> int:
    """Bytes of a record's arrays in memory (input_ids, loss_mask, top-k ids and log-probs, tail;
    offsets and text when stored)."""
    extra = 0 if r.offsets is None else r.offsets.nbytes + len(r.text)
    return extra + sum(a.nbytes for a in (r.input_ids, r.loss_mask, r.topk_ids, r.topk_logprobs, r.tail_logprob))


def cache_record_from_targets(sample, topk_ids: np.ndarray, topk_logprobs: np.ndarray, tail: np.ndarray,
                              target_logprob: np.ndarray) -> CacheRecord:
    """Build a :class:`CacheRecord` from one sample's unpadded (T-1, ...) teacher outputs."""
    valid = sample.loss_mask[1:]
    return CacheRecord(sample.sample_id, sample.input_ids, sample.loss_mask, topk_ids, topk_logprobs, tail,
                       float(-target_logprob[valid].astype(np.float64).sum()), getattr(sample, "text", None),
                       getattr(sample, "offsets", None))
