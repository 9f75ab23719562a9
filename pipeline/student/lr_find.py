"""LR range test (Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017; the
fastai ``lr_find`` variant): train with an exponentially increasing learning rate and record
the loss, to choose a learning rate where the loss still falls fastest."""
from __future__ import annotations

import csv
import math
from pathlib import Path

from pipeline.config import LRFindConfig
from pipeline.distributed import DistInfo, print0
from pipeline.student.sampler import StepPrefetcher, StepSampler
from pipeline.student.streams import StreamSampler
from pipeline.storage import Folder, join
from pipeline.student.step import Trainer


def run_lr_find(cfg: LRFindConfig, trainer: Trainer, sampler: StepSampler | StreamSampler, train_src,
                run_dir: str | Path, info: DistInfo, pack_length: int | None = None) -> dict | None:
    """Run up to ``cfg.steps`` optimizer steps with ``lr_i = min_lr · (max_lr / min_lr)^(i / (steps-1))``
    (each parameter group keeps its ratio to the base LR), stop early once the smoothed loss
    exceeds 4× its minimum, and write ``lr_find.csv`` (+ ``lr_find.png`` when matplotlib is
    installed) to ``run_dir`` (on a store: written to a local staging directory, then uploaded).

    Returns (rank 0): ``{"suggested_lr": ..., "rows": [...]}`` where the suggestion is the LR of
    the minimum smoothed loss divided by 10 (a common rule of thumb). The model's weights are
    changed by the probe: it is not a training run. ``pack_length``: packed micro-batches, as
    in training (``data.packing``).
    """
    opt = trainer.optimizer
    base = [g["lr"] for g in opt.param_groups]
    ref = max(base)
    trainer.scheduler = None
    rows, avg, best = [], 0.0, math.inf
    loader = StepPrefetcher(sampler, train_src, num_workers=0, pack_length=pack_length)
    for i in range(cfg.steps):
        lr = cfg.min_lr * (cfg.max_lr / cfg.min_lr) ** (i / max(cfg.steps - 1, 1))
        for g, b in zip(opt.param_groups, base):
            g["lr"] = lr * b / ref
        stats = trainer.train_step(loader.next_step())
        avg = 0.98 * avg + 0.02 * stats.loss  # exponential moving average, debiased below
        smooth = avg / (1 - 0.98 ** (i + 1))
        rows.append({"step": i + 1, "lr": lr, "loss": stats.loss, "smoothed_loss": smooth})
        best = min(best, smooth)
        if not math.isfinite(smooth) or smooth > 4 * best:
            break
    if not info.is_main:
        return None
    with Folder(run_dir).written_locally() as d:  # on a store: staged, then uploaded
        out = _write_outputs(rows, d)
    print0(f"[lr-find] {len(rows)} steps; minimum smoothed loss at lr {out * 10:.3g}; suggested lr {out:.3g}; "
           f"table in {join(run_dir, 'lr_find.csv')}")
    return {"suggested_lr": out, "rows": rows}


def _write_outputs(rows: list[dict], run_dir: Path) -> float:
    """Write ``lr_find.csv`` (and the plot) into the local directory ``run_dir``; returns the
    suggested learning rate."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "lr_find.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    finite = [r for r in rows if math.isfinite(r["smoothed_loss"])]
    suggested = min(finite, key=lambda r: r["smoothed_loss"])["lr"] / 10
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["lr"] for r in finite], [r["smoothed_loss"] for r in finite])
        ax.axvline(suggested, ls="--", c="gray")
        ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss", title="LR range test")
        fig.savefig(run_dir / "lr_find.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
    except ImportError:
        pass
    return suggested
