"""``train-student --config FILE [key=value ...]``: stage 2.

Trains an FSDP2 student from the teacher cache only, with the hybrid loss
``α·CE + (1−α)·τ²·KL`` normalised by the valid tokens of the whole optimizer step.
``--lr-find`` runs an LR range test instead (``lr_find.{min_lr,max_lr,steps}``).
"""
from __future__ import annotations

import sys

from pipeline.cli import run_stage
from pipeline.config import TrainStudentConfig


FLAGS = {"--lr-find": ("lr_find.enabled=true", "run an LR range test instead of training; writes lr_find.csv/.png "
                                               "in output_dir (lr_find.{min_lr,max_lr,steps})")}
"""The stage's own flags (listed by ``--help``): flag → (the override it stands for, help)."""


def main(argv: list[str] | None = None) -> int:
    from pipeline.student.loop import run

    return run_stage("train-student", TrainStudentConfig, run, argv, __doc__.splitlines()[0], flags=FLAGS)


if __name__ == "__main__":
    sys.exit(main())
