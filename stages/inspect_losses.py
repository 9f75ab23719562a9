"""``inspect-losses RUN_DIR``: per-round/split summary and the hardest samples of a run.

Reads ``RUN_DIR/loss_logs`` (hive-partitioned parquet); decodes sample text through the
run's caches and tokenizer. ``--export FILE.csv|FILE.parquet`` writes the per-sample table.
The report is built by :mod:`pipeline.losslog.report`; this module parses and prints.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="inspect-losses", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--round", type=int, default=None, help="only this round")
    p.add_argument("--split", choices=["train", "eval"], default=None, help="only this split")
    p.add_argument("--min-tokens", type=int, default=None, help="ignore visits with fewer valid tokens")
    p.add_argument("--top", type=int, default=10, help="how many hardest samples to show")
    p.add_argument("--metric", choices=["loss", "ce", "kl", "distill"], default="loss",
                   help="hardness = this per token (distill: the configured loss.divergence)")
    p.add_argument("--export", default=None, help="write the per-sample table to FILE.csv or FILE.parquet")
    p.add_argument("--compare", nargs=2, type=int, metavar=("R1", "R2"), default=None,
                   help="samples whose per-token metric moved most from round R1 to R2 (train split)")
    p.add_argument("--plot", default=None, help="write FILE.png: histogram per round (+ R1-vs-R2 scatter)")
    args = p.parse_args(argv)

    from pipeline.losslog.reader import check_metric, check_selection, load_loss_logs, missing_rounds
    from pipeline.losslog.report import report_sections
    from pipeline.storage import StoreError, one_line

    try:  # a round or split not in the logs: named, with what is there; a store failure: its cause
        check_selection(args.run_dir, args.round, args.split, args.compare)
        gone = missing_rounds(args.run_dir)
        if gone and args.round is None:  # a round left out of the report is never left out silently
            print(f"inspect-losses: warning: rounds.json of {args.run_dir} lists round(s) "
                  f"{', '.join(str(r) for r, _ in gone)} as trained, but their loss logs are missing "
                  f"({', '.join(d for _, d in gone)}): left out of this report", file=sys.stderr)
        table = load_loss_logs(args.run_dir, args.round, args.split, args.min_tokens)
        check_metric(table, args.metric, args.run_dir)
    except (FileNotFoundError, ValueError, StoreError) as e:  # no logs; a part that is not parquet (named)
        print(f"inspect-losses: error: {one_line(e)}", file=sys.stderr)
        return 2
    if table.num_rows == 0:
        print("inspect-losses: no rows match", file=sys.stderr)
        return 1
    for section in report_sections(table, args.run_dir, args.top, args.metric, args.compare, args.plot, args.export):
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
