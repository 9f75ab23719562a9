"""How fast inspect-losses reads a large loss log.

Writes a synthetic log of ``--rows`` rows (default 5 million: ``--samples`` sample IDs visited
several times, over 2 rounds and 2 ranks, in the hive layout train-student writes), then times
the reading side: loading the directory, the per-round summary, the hardest 20 samples and the
round-0-vs-1 comparison, against a baseline measured in the same run (a plain
``pyarrow.dataset`` scan of the same files).

    .venv/bin/python bench/inspect_5m.py [--rows 5000000] [--dir DIR]   (default: kd-inspect-bench in the system temp dir)
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.losslog.reader import compare_rounds, hardest, load_loss_logs, summary  # noqa: E402
from pipeline.losslog.writer import SCHEMA  # noqa: E402


def write_log(root: Path, rows: int, samples: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    ids = np.array([f"doc-{i:07d}" for i in range(samples)], dtype=object)
    parts = [(r, k) for r in (0, 1) for k in (0, 1)]
    per = rows // len(parts)
    for r, k in parts:
        d = root / f"round={r}" / "split=train" / f"rank={k}"
        d.mkdir(parents=True, exist_ok=True)
        idx = rng.integers(0, samples, per)
        ntok = rng.integers(16, 512, per).astype(np.int32)
        ce = (rng.gamma(2.0, 1.0, per) * ntok).astype(np.float32)
        kl = (rng.gamma(1.0, 0.3, per) * ntok).astype(np.float32)
        t = pa.table({"sample_id": pa.array(ids[idx], pa.string()), "epoch": np.zeros(per, np.int32),
                      "step": np.arange(per, dtype=np.int64) // 32, "n_tokens": ntok, "ce_sum": ce, "kl_sum": kl,
                      "loss_sum": 0.5 * ce + 0.5 * kl, "top1_agree": np.zeros(per, np.int32),
                      "topk_mass_sum": np.zeros(per, np.float32),
                      "teacher_entropy_sum": np.zeros(per, np.float32)}, schema=SCHEMA)
        pq.write_table(t, d / "part-00000.parquet", compression="zstd")


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=5_000_000)
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "kd-inspect-bench"))
    a = p.parse_args()
    run = Path(a.dir)
    shutil.rmtree(run, ignore_errors=True)
    _, t_write = timed(lambda: write_log(run / "loss_logs", a.rows, a.samples))
    _, t_base = timed(lambda: pads.dataset(str(run / "loss_logs"), format="parquet", partitioning="hive").to_table())
    table, t_load = timed(lambda: load_loss_logs(run))
    _, t_sum = timed(lambda: summary(table))
    _, t_hard = timed(lambda: hardest(table, 20))
    _, t_cmp = timed(lambda: compare_rounds(table, 0, 1))
    total = t_load + t_sum + t_hard + t_cmp
    print(f"{table.num_rows:,} rows, {a.samples:,} sample IDs (written in {t_write:.1f}s)")
    print("| step | seconds | × plain dataset scan |\n|---|---:|---:|")
    for name, t in (("plain pyarrow.dataset scan (baseline)", t_base), ("load_loss_logs", t_load),
                    ("summary per round/split", t_sum), ("hardest 20", t_hard), ("compare round 0 vs 1", t_cmp),
                    ("all of inspect-losses' work", total)):
        print(f"| {name} | {t:.2f} | {t / t_base:.1f} |")
    shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
