"""Synthetic cache records and a tiny student for numerics tests (no files, no downloads)."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.cache.records import CacheRecord


def synthetic_records(n: int, vocab: int, k: int, seed: int = 0, min_len: int = 5, max_len: int = 24,
                      padded: bool = False) -> list[CacheRecord]:
    """Records of varying length with random loss masks and a valid random top-k per position;
    ``padded``: a random number of trailing slots are padding (id 0, -inf), as sampled targets have."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        T = int(rng.integers(min_len, max_len + 1))
        ids = rng.integers(0, vocab, T).astype(np.int32)
        mask = rng.random(T) < 0.8
        logits = rng.normal(size=(T - 1, vocab)) * 2
        lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        top = np.argsort(-lp, axis=-1)[:, :k]
        vals = np.take_along_axis(lp, top, -1)
        if padded:
            n_real = rng.integers(1, k + 1, T - 1)
            pad = np.arange(k)[None, :] >= n_real[:, None]
            vals, top = np.where(pad, -np.inf, vals), np.where(pad, 0, top)
        tail = np.log1p(-np.exp(vals).sum(-1))
        out.append(CacheRecord(f"s{i}", ids, mask, top.astype(np.int32), vals.astype(np.float32),
                               tail.astype(np.float32), 0.0))
    return out


def tiny_student(vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM

    from pipeline.data.demo_corpus import llama_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(vocab, 16, 2, 2, 1, 32))
    model.config.use_cache = False
    return model
