"""``inspect-losses RUN_DIR``: per-round/split summary and the hardest samples of a run.

Reads ``RUN_DIR/loss_logs`` (hive-partitioned parquet); decodes sample text through the
run's caches and tokenizer. ``--export FILE.csv|FILE.parquet`` writes the per-sample table.
"""
from __future__ import annotations

import argparse
import sys


def _fmt(rows: list[dict], cols: list[str]) -> str:
    cells = [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="inspect-losses", description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--round", type=int, default=None, help="only this round")
    p.add_argument("--split", choices=["train", "eval"], default=None, help="only this split")
    p.add_argument("--min-tokens", type=int, default=None, help="ignore visits with fewer valid tokens")
    p.add_argument("--top", type=int, default=10, help="how many hardest samples to show")
    p.add_argument("--metric", choices=["loss", "ce", "kl"], default="loss", help="hardness = this per token")
    p.add_argument("--export", default=None, help="write the per-sample table to FILE.csv or FILE.parquet")
    p.add_argument("--compare", nargs=2, type=int, metavar=("R1", "R2"), default=None,
                   help="samples whose per-token metric moved most from round R1 to R2 (train split)")
    p.add_argument("--plot", default=None, help="write FILE.png: histogram per round (+ R1-vs-R2 scatter)")
    args = p.parse_args(argv)

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from pipeline.losslog.reader import SampleText, compare_rounds, hardest, load_loss_logs, per_sample, plot, summary

    try:
        table = load_loss_logs(args.run_dir, args.round, args.split, args.min_tokens)
    except (FileNotFoundError, ValueError) as e:  # no logs; a part that is not parquet (named)
        print(f"inspect-losses: error: {e}", file=sys.stderr)
        return 2
    if table.num_rows == 0:
        print("inspect-losses: no rows match", file=sys.stderr)
        return 1
    print(f"loss logs of {args.run_dir}: {table.num_rows} rows")
    ps = per_sample(table)  # one group-by, shared by every report below
    print(_fmt(summary(table, ps), ["round", "split", "rows", "samples", "tokens", "loss_per_token", "ce_per_token",
                                "kl_per_token", "p10", "p50", "p90"]))
    top = hardest(table, args.top, args.metric, ps).to_pylist()
    text = SampleText(args.run_dir)
    for r in top:
        r["text"] = text(r["sample_id"])
    print(f"\nhardest {len(top)} samples by {args.metric} per token:")
    print(_fmt(top, ["round", "split", "sample_id", "visits", "n_tokens", f"{args.metric}_per_token", "text"]))
    if args.compare:
        r1, r2 = args.compare
        moved = compare_rounds(table, r1, r2, metric=args.metric, samples=ps).slice(0, args.top).to_pylist()
        for r in moved:
            r["text"] = text(r["sample_id"])
        print(f"\n{len(moved)} samples that moved most from round {r1} to {r2} ({args.metric} per token, train):")
        cols = list(moved[0]) if moved else ["sample_id"]
        print(_fmt(moved, cols))
    if args.plot:
        plot(table, args.plot, args.metric, tuple(args.compare) if args.compare else None, ps)
        print(f"\nplot written to {args.plot}")
    if args.export:
        if args.export.endswith(".csv"):
            pacsv.write_csv(ps, args.export)
        else:
            pq.write_table(ps, args.export)
        print(f"\nper-sample table ({ps.num_rows} rows) written to {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
