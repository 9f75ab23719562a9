"""How teacher targets are coded on disk, shared by every backend (DESIGN.md, Cache store).

A position's targets are ``k`` slots of (token id, log-probability) sorted by descending
log-probability, plus the tail log-mass. The codec turns them into narrow arrays that a
lossless codec (zstd) then compresses well, and back:

* **index dtype**: ``uint16`` when the vocabulary has at most 65,536 entries, else ``int32``.
* **index coding** ``plain``: ids in probability order. ``delta``: each position's slots are
  re-ordered by ascending token id and the ids stored as first differences (the first id
  itself, then gaps), which are small and compress far better than raw ids; the values are
  stored in the same id order and the decoder restores probability order with a stable sort
  (Witten, Moffat & Bell, *Managing Gigabytes*, 2nd ed., 1999, §3.3: d-gaps of sorted
  posting lists).
* **value dtype** ``float32`` / ``float16`` / ``bfloat16`` (stored as the upper 16 bits of a
  float32, rounded to nearest even), or ``q8``: an 8-bit code of the distance to the
  position's top-1 log-probability, ``code = round((ref - v) / step)`` with ``ref`` the top-1
  value (stored as float16, one per position) and ``step`` nats per code; code 255 is
  ``-inf`` (padding slots of sampled targets). The rounding error ``e`` is uniform on
  ``[-step/2, step/2]``, so the KL between the stored and the exact top-k distribution is
  about ``Var_p(e)/2 ≈ step²/24`` (second-order expansion of KL for small log-ratio
  perturbations; Cover & Thomas, *Elements of Information Theory*, 2nd ed., §11.10):
  ``6.5e-4`` nats at ``step = 1/8``, ``1.6e-4`` at ``1/16``. Values more than ``254·step``
  below the top-1 are clamped there (relative probability ``< e^-15.9`` at ``step=1/16``).
* **tail** log-mass: float32 with float32 values, float16 otherwise.

Decoded arrays are always ``topk_ids`` int32 (P, k) in descending-probability order,
``topk_logprobs`` float32 (P, k) and ``tail_logprob`` float32 (P,).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VALUE_DTYPES = ("float32", "float16", "bfloat16", "q8")
INDEX_CODINGS = ("plain", "delta")
Q8_PAD = 255


@dataclass(frozen=True)
class Encoding:
    """On-disk coding of one cache (recorded in the manifest).

    Attributes:
        index_dtype: ``uint16`` or ``int32``.
        value_dtype: one of :data:`VALUE_DTYPES`.
        index_coding: ``plain`` or ``delta``.
        q8_step: nats per code of ``q8`` values.
    """

    index_dtype: str
    value_dtype: str
    index_coding: str = "plain"
    q8_step: float = 1 / 8

    def __post_init__(self) -> None:
        if self.value_dtype not in VALUE_DTYPES:
            raise ValueError(f"value_dtype {self.value_dtype!r} is not one of {VALUE_DTYPES}")
        if self.index_coding not in INDEX_CODINGS:
            raise ValueError(f"index_coding {self.index_coding!r} is not one of {INDEX_CODINGS}")
        if self.index_dtype not in ("uint16", "int32"):
            raise ValueError(f"index_dtype {self.index_dtype!r} is not uint16 or int32")

    @property
    def tail_dtype(self) -> str:
        return "float32" if self.value_dtype == "float32" else "float16"

    @property
    def mass_tolerance(self) -> float:
        """How far above 1 the decoded probability mass of a position may lie: rounding every
        log-probability up by the coding's worst error ``e`` scales the mass by ``exp(e)``
        (q8: ``step/2`` plus the float16 top-1 reference; bfloat16: 2^-8 relative on values
        of magnitude ≤ 4 for the slots that carry the mass)."""
        worst = {"float32": 0.0, "float16": 4 * 2.0**-11, "bfloat16": 4 * 2.0**-8,
                 "q8": self.q8_step / 2 + 2.0**-11}[self.value_dtype]
        return max(1e-2, float(np.expm1(worst)) + 1e-3)

    @staticmethod
    def index_dtype_for(vocab_size: int) -> str:
        """``uint16`` when every token id fits in 16 bits, else ``int32``."""
        return "uint16" if vocab_size <= 65536 else "int32"


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), round to nearest even; ±inf preserved."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def _from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def encode_targets(topk_ids: np.ndarray, topk_logprobs: np.ndarray, tail_logprob: np.ndarray,
                   enc: Encoding) -> dict[str, np.ndarray]:
    """Code P positions of targets for storage.

    Args:
        topk_ids: (P, k) integer ids, slots in descending-probability order.
        topk_logprobs: (P, k) float log-probabilities (``-inf`` only in trailing padding slots).
        tail_logprob: (P,) float tail log-mass.
    Returns:
        ``topk_ids`` (P, k) ``enc.index_dtype``, ``topk_values`` (P, k) (float32, float16,
        uint16 bfloat16 bits or uint8 codes), ``tail_logprob`` (P,) ``enc.tail_dtype``, and
        for ``q8`` ``value_ref`` (P,) float16.
    """
    ids = np.asarray(topk_ids).astype(np.int64, copy=False)
    vals = np.asarray(topk_logprobs, dtype=np.float32)
    P, k = vals.shape
    if enc.index_coding == "delta" and P:
        pad = np.isneginf(vals)
        order = np.argsort(np.where(pad, np.iinfo(np.int64).max, ids), axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        vals = np.take_along_axis(vals, order, axis=1)
        pad = np.take_along_axis(pad, order, axis=1)
        # padding slots repeat the last real id (a zero gap)
        last_real = np.maximum((~pad).sum(1) - 1, 0)
        ids = np.where(pad, ids[np.arange(P), last_real][:, None], ids)
        ids = np.diff(ids, axis=1, prepend=0)
    out = {"topk_ids": ids.astype(enc.index_dtype), "tail_logprob": np.asarray(tail_logprob, dtype=enc.tail_dtype)}
    if enc.value_dtype == "q8":
        ref = vals.max(axis=1).astype(np.float16) if P else np.zeros(0, np.float16)
        dist = (ref.astype(np.float32)[:, None] - vals) / np.float32(enc.q8_step)
        codes = np.clip(np.rint(np.where(np.isneginf(vals), 0, dist)), 0, Q8_PAD - 1).astype(np.uint8)
        out["topk_values"] = np.where(np.isneginf(vals), np.uint8(Q8_PAD), codes)
        out["value_ref"] = ref
    elif enc.value_dtype == "bfloat16":
        out["topk_values"] = _to_bf16_bits(vals)
    else:
        out["topk_values"] = vals.astype(enc.value_dtype)
    return out


def _values(raw: np.ndarray, ref: np.ndarray | None, enc: Encoding) -> np.ndarray:
    """Stored values → (P, k) float32 log-probabilities (``ref``: q8 top-1 references)."""
    if enc.value_dtype == "q8":
        vals = ref.astype(np.float32)[:, None] - raw.astype(np.float32) * np.float32(enc.q8_step)
        vals[raw == Q8_PAD] = -np.inf
        return vals
    if enc.value_dtype == "bfloat16":
        return _from_bf16_bits(raw)
    return raw.astype(np.float32)


def decode_targets(arrays: dict[str, np.ndarray], enc: Encoding) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`encode_targets`.

    Returns:
        ``topk_ids`` (P, k) int32 in descending-probability order (padding slots: id 0),
        ``topk_logprobs`` (P, k) float32 (padding ``-inf``), ``tail_logprob`` (P,) float32.
    """
    raw = arrays["topk_values"]
    ids = arrays["topk_ids"]
    if enc.index_coding == "delta":
        ids = np.cumsum(ids, axis=1, dtype=np.int32)
        # restore descending-probability order; q8: ascending codes = descending values, and
        # numpy's stable sort of 8-bit integers is a radix sort (5x faster than sorting floats)
        key = raw if enc.value_dtype == "q8" else -_values(raw, None, enc)
        flat = (np.argsort(key, axis=1, kind="stable") + (np.arange(len(key)) * key.shape[1])[:, None]).ravel()
        ids, raw = ids.ravel()[flat].reshape(ids.shape), raw.ravel()[flat].reshape(raw.shape)
    vals = _values(raw, arrays.get("value_ref"), enc)
    if enc.index_coding == "delta":
        ids[np.isneginf(vals)] = 0
    return ids.astype(np.int32), vals, arrays["tail_logprob"].astype(np.float32)


def reconstruction_kl(exact_logprobs: np.ndarray, stored_logprobs: np.ndarray) -> np.ndarray:
    """Per-position KL(p ‖ p̂) in nats between the exact and the stored top-k distributions,
    each renormalised over its k slots (same slot order).

    Args:
        exact_logprobs, stored_logprobs: (P, k) float log-probabilities.
    Returns:
        (P,) float64 KL values (``>= 0`` up to rounding).
    """
    def norm(x):
        x = np.asarray(x, dtype=np.float64)
        m = x.max(axis=1, keepdims=True)
        return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))

    lp, lq = norm(exact_logprobs), norm(stored_logprobs)
    p = np.exp(lp)
    return np.where(p > 0, p * (lp - np.where(np.isfinite(lq), lq, -1e30)), 0.0).sum(axis=1)
