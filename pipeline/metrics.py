"""Metrics to wandb (rank 0; disabled | offline | online), the console and ``metrics.jsonl``.

Names follow DESIGN.md: ``train/loss, train/ce_loss, train/kl_loss, train/learning_rate,
train/grad_norm, train/epoch, train/step, train/tokens_per_second`` and ``eval/loss,
eval/ce_loss, eval/kl_loss, eval/min_loss, eval/epoch, eval/step``, plus ``round``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.config import WandbConfig
from pipeline.errors import writing


class MetricsLogger:
    """Rank-0 metrics sink; on other ranks every method is a no-op.

    Args:
        run_dir: where ``metrics.jsonl`` (one JSON object per log call) and ``wandb/`` go.
        config: the whole resolved config, sent to wandb as the run config.
    """

    def __init__(self, run_dir: str | os.PathLike, rank: int, cfg: WandbConfig, config: dict):
        self.active = rank == 0
        self.run = None
        if not self.active:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        if cfg.mode != "disabled":
            import wandb

            self.run = wandb.init(project=cfg.project, name=cfg.name, mode=cfg.mode, dir=str(run_dir),
                                  config=config, reinit="finish_previous")

    def log(self, metrics: dict, step: int) -> None:
        if not self.active:
            return
        with writing("metrics", self.path), open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
