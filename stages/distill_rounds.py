"""``distill-rounds --config FILE [key=value ...]``: on-policy distillation in rounds.

Per round: generate-completions (from the teacher, the previous round's student or a given
model) → precompute-teacher on those completions → train-student on the new cache (mixed with
other caches by weight) from the previous round's student, each step a subprocess through its
stage's command line (torchrun when ``nproc_per_node`` > 1). A rerun resumes at the first step
not marked complete in ``output_dir/rounds.json``; it is refused when the config of a step that
has started differs from the one it ran with, unless ``--restart`` starts the run over.
"""
from __future__ import annotations

import os
import sys

from pipeline.cli import USER_ERRORS, parse
from pipeline.config import DistillRoundsConfig, load_config
from pipeline.storage.errors import one_line

SWITCHES = {"--restart": "start the run over: delete output_dir's rounds.json, config.yaml and round-R/ "
                         "directories, then run every round (a rerun with a changed config is refused without it)"}
"""The stage's own options (listed by ``--help``), never config keys."""


def main(argv: list[str] | None = None) -> int:
    """Exit code: 0 when every round is complete; 2 on a bad config or a failed step (one line
    on stderr naming it; ``KD_DEBUG=1`` re-raises)."""
    args = parse("distill-rounds", __doc__.splitlines()[0], argv, switches=SWITCHES)
    from pipeline.rounds_driver import run_rounds

    try:
        cfg = load_config(DistillRoundsConfig, args.config, args.overrides)
        run_rounds(cfg, log=lambda s: print(s, flush=True), restart=args.restart)
    except USER_ERRORS as e:
        if os.environ.get("KD_DEBUG", "") not in ("", "0"):
            raise
        print(f"distill-rounds: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
