"""Metrics to wandb (rank 0; disabled | offline | online), the console and ``metrics.jsonl``.

Names follow DESIGN.md: ``train/loss, train/ce_loss, train/kl_loss, train/distill_loss, train/learning_rate,
train/grad_norm, train/epoch, train/step, train/tokens_per_second`` and ``eval/loss,
eval/ce_loss, eval/kl_loss, eval/distill_loss, eval/min_loss, eval/epoch, eval/step``, plus ``round``.
"""
from __future__ import annotations

import json
import os
import time

from pipeline.config import WandbConfig
from pipeline.storage.errors import writing
from pipeline.storage import Folder

UPLOAD_EVERY_S = 30.0
"""A run directory on a store: ``metrics.jsonl`` is re-uploaded whole at most this often
(seconds), and at every checkpoint and at the end (:meth:`MetricsLogger.flush`)."""


class MetricsLogger:
    """Rank-0 metrics sink; on other ranks every method is a no-op.

    Args:
        run_dir: where ``metrics.jsonl`` (one JSON object per log call) and ``wandb/`` go. A URL:
            ``metrics.jsonl`` is kept in memory (appended to what the store holds, for a resumed
            run) and uploaded whole every :data:`UPLOAD_EVERY_S`; wandb's files stay local
            (``./wandb``).
        config: the whole resolved config (credentials redacted), sent to wandb as the run config.
    """

    def __init__(self, run_dir: str | os.PathLike, rank: int, cfg: WandbConfig, config: dict):
        self.active = rank == 0
        self.run = None
        if not self.active:
            return
        self.folder = Folder(run_dir)
        self.path = self.folder.join("metrics.jsonl")
        self.buffered = self.folder.is_remote  # a store cannot append: kept in memory, uploaded whole
        if self.buffered:
            self.lines = [self.folder.read_bytes("metrics.jsonl")] if self.folder.isfile("metrics.jsonl") else []
            self.uploaded = time.monotonic()
        if cfg.mode != "disabled":
            import wandb

            self.run = wandb.init(project=cfg.project, name=cfg.name, mode=cfg.mode,
                                  dir=None if self.buffered else str(run_dir),
                                  config=config, reinit="finish_previous")

    def log(self, metrics: dict, step: int) -> None:
        """Record ``metrics`` at optimizer step ``step`` (rank 0 only): a line appended to
        ``metrics.jsonl`` locally (kept in memory on a store, uploaded every
        :data:`UPLOAD_EVERY_S`), and sent to wandb when enabled.

        Raises:
            StorageError: an I/O error writing ``metrics.jsonl``.
        """
        if not self.active:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self.buffered:
            self.lines.append(line.encode())
            if time.monotonic() - self.uploaded >= UPLOAD_EVERY_S:
                self.flush()
        else:
            with writing("metrics", self.path), open(self.path, "a") as fh:
                fh.write(line)
        if self.run is not None:
            self.run.log(metrics, step=step)

    def flush(self) -> None:
        """Upload ``metrics.jsonl`` now (a run directory on a store; a no-op on a local disk,
        where every line is appended as it is logged)."""
        if self.active and self.buffered:
            with writing("metrics", self.path):
                self.folder.write_bytes("metrics.jsonl", b"".join(self.lines))
            self.uploaded = time.monotonic()

    def finish(self) -> None:
        """Upload the metrics (a store) and close the wandb run.

        Raises:
            StorageError: an I/O error writing ``metrics.jsonl``.
        """
        self.flush()
        if self.run is not None:
            self.run.finish()
            self.run = None
