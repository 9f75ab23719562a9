"""``train-student --config FILE [key=value ...]``: stage 2.

Trains an FSDP2 student from the teacher cache only, with the hybrid loss
``α·CE + (1−α)·τ²·KL`` normalised by the valid tokens of the whole optimizer step.
"""
from __future__ import annotations

import sys

from pipeline.cli import run_stage
from pipeline.config import TrainStudentConfig


def main(argv: list[str] | None = None) -> int:
    from pipeline.train_run import train

    return run_stage("train-student", TrainStudentConfig, train, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
