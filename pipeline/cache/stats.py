"""What ``inspect-cache`` reports: the manifest, sizes, bytes per token, and distributions of
the captured top-k probability mass and of the teacher entropy over valid positions."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.cache import cache_bytes, open_cache
from pipeline.numerics import position_stats
from pipeline.storage import Folder

QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


def cache_summary(cache_dir: str | os.PathLike, max_samples: int | None = None) -> tuple[dict, dict]:
    """Summary of a cache (complete or not) and the raw per-position arrays behind it.

    Args:
        max_samples: read only the first N samples (in storage order) for the distributions;
            sizes and counts always cover the whole cache.
    Returns:
        (summary, arrays): ``summary`` is JSON-ready with at least ``backend``, ``complete``,
        ``k``, ``n_samples``, ``n_tokens``, ``bytes_per_token``; ``arrays`` has ``mass`` and
        ``entropy`` (P,) float64 over the valid positions read.
    Raises:
        FileNotFoundError / ValueError: see :func:`pipeline.cache.open_cache`.
    """
    r = open_cache(cache_dir, allow_incomplete=True, verify=False)
    m = r.manifest
    n_tokens = int(r.lengths().sum())
    n_bytes = cache_bytes(cache_dir)
    masses, ents, read = [], [], 0
    for blk in r.iter_blocks():
        n = len(blk.sample_ids) if max_samples is None else min(len(blk.sample_ids), max_samples - read)
        if n <= 0:
            break
        valid = np.concatenate([blk.loss_mask[blk.tok_off[j] + 1: blk.tok_off[j + 1]] for j in range(n)])
        p_end = blk.pos_off[n]
        mass, ent = position_stats(blk.topk_logprobs[:p_end][valid], blk.tail_logprob[:p_end][valid])
        masses.append(mass)
        ents.append(ent)
        read += n
    mass = np.concatenate(masses) if masses else np.zeros(0)
    ent = np.concatenate(ents) if ents else np.zeros(0)

    def quantiles(x: np.ndarray) -> dict:
        return {f"q{int(q * 100):02d}": float(np.quantile(x, q)) for q in QUANTILES} | {"mean": float(x.mean())} if x.size else {}

    n_valid = int(sum(s.num_valid_positions for s in r.shards))
    # The closed shards' totals: an incomplete cache's manifest has no totals yet.
    closed = m.model_copy(update={"teacher_nll_sum": float(r.teacher_nll_sum.sum()), "num_valid_positions": n_valid})
    summary = {
        "dir": Folder(cache_dir).absolute(), "backend": m.backend, "complete": m.complete, "format_version": m.format_version,
        "target_type": m.target_type, "k": m.k, "vocab_size": m.vocab_size, "temperature": m.temperature,
        "index_dtype": m.index_dtype, "index_coding": m.index_coding, "value_dtype": m.value_dtype,
        "compression": m.compression, "teachers": [t.model_dump() for t in m.teachers],
        "n_shards": len(r.shards), "n_samples": len(r), "n_tokens": n_tokens,
        "n_valid_positions": n_valid,
        "bytes": n_bytes, "bytes_per_token": n_bytes / max(n_tokens, 1),
        "teacher_perplexity": closed.teacher_perplexity,
        "skipped_empty": m.skipped_empty, "positions_read": int(mass.size),
        "topk_mass": quantiles(mass), "teacher_entropy_nats": quantiles(ent),
    }
    return summary, {"mass": mass, "entropy": ent}


def format_summary(s: dict) -> str:
    """Terminal rendering of :func:`cache_summary`."""
    lines = [f"cache {s['dir']}",
             f"  backend {s['backend']}  complete {s['complete']}  format v{s['format_version']}  targets {s['target_type']}"
             f"  k {s['k']}  V {s['vocab_size']}  temperature {s['temperature']}",
             f"  coding: ids {s['index_dtype']}/{s['index_coding']}, values {s['value_dtype']}, {s['compression']}",
             "  teachers: " + ", ".join(f"{t['path']} (w={t['weight']:g}, {t['fingerprint'][:12]})" for t in s["teachers"]),
             f"  {s['n_samples']:,} samples, {s['n_tokens']:,} tokens, {s['n_valid_positions']:,} valid positions, "
             f"{s['n_shards']} shards, {s['skipped_empty']} empty samples skipped",
             f"  {s['bytes']:,} bytes on disk = {s['bytes_per_token']:.1f} bytes/token; teacher perplexity "
             f"{s['teacher_perplexity']:.3f}",
             f"  distributions over {s['positions_read']:,} valid positions:",
             "  quantile      " + " ".join(f"{k:>7}" for k in s["topk_mass"])]
    for name, key in (("top-k mass", "topk_mass"), ("entropy nats", "teacher_entropy_nats")):
        lines.append(f"  {name:<13} " + " ".join(f"{v:7.4f}" for v in s[key].values()))
    return "\n".join(lines)


def plot_summary(arrays: dict, s: dict, path: str | os.PathLike) -> None:
    """Histograms of the captured top-k mass and the teacher entropy, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].hist(arrays["mass"], bins=50)
    axes[0].set(xlabel=f"top-{s['k']} probability mass", ylabel="positions")
    axes[1].hist(arrays["entropy"], bins=50)
    axes[1].set(xlabel="teacher entropy (nats, tail as one outcome)")
    fig.suptitle(f"{Path(s['dir']).name}: {s['n_samples']:,} samples, {s['bytes_per_token']:.1f} bytes/token")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
