"""``generate-completions --config FILE [key=value ...]``: sample completions of a prompt dataset.

Samples ``sampling.num_completions`` completions per prompt from a model directory (a teacher:
sequence-level KD; a student: on-policy data), seeded per completion, and writes a dataset of
token IDs that ``precompute-teacher`` reads as is. One process, or ``torchrun
--nproc_per_node=N`` (data parallel: every rank a whole model, the same rows at any N).
"""
from __future__ import annotations

import sys

from pipeline.cli import run_stage
from pipeline.config import GenerateConfig


def main(argv: list[str] | None = None) -> int:
    from pipeline.generation import generate

    return run_stage("generate-completions", GenerateConfig, generate, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
