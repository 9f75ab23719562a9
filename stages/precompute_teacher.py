"""``precompute-teacher --config FILE [key=value ...]``: stage 1.

Runs the frozen teacher (or same-vocabulary ensemble) over a tokenized dataset and writes
sparse top-k log-probabilities plus the tail log-mass, keyed by sample ID, to a cache.
One process, or ``torchrun --nproc_per_node=N`` (FSDP2-sharded teacher, gloo/NCCL).
"""
from __future__ import annotations

import sys

from pipeline.cli import run_stage
from pipeline.config import PrecomputeConfig


def main(argv: list[str] | None = None) -> int:
    from pipeline.teacher.precompute import precompute

    return run_stage("precompute-teacher", PrecomputeConfig, precompute, argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
