"""The ``inspect-losses`` report of a run's loss logs, section by section: the summary per
round and split, the hardest samples (their text decoded through the run's caches and
tokenizer), optionally the samples that moved most between two rounds, a plot, and an export of
the per-sample table. ``stages/inspect_losses.py`` parses the command line and prints it.
"""
from __future__ import annotations

import os
from typing import Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.losslog.reader import SampleText, compare_rounds, hardest, per_sample, plot, summary


def _fmt(rows: list[dict], cols: list[str]) -> str:
    cells = [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def report_sections(table: pa.Table, run_dir: str | os.PathLike, top: int = 10, metric: str = "loss",
                    compare: tuple[int, int] | None = None, plot_path: str | None = None,
                    export: str | None = None) -> Iterator[str]:
    """The report of ``table`` (rows of :func:`~pipeline.losslog.reader.load_loss_logs`, at
    least one) as printable sections, in order; the plot and the export are written when their
    section is reached.

    Args:
        run_dir: the run the logs belong to (named; its caches and tokenizer decode sample text).
        top: how many hardest (and most moved) samples to list.
        metric: ``loss``, ``ce``, ``kl`` or ``distill`` (the configured divergence): hardness
            is this per token.
        compare: ``(R1, R2)``: also the samples whose per-token metric moved most from round
            R1 to R2 (train split), and their scatter in the plot.
        plot_path: write a PNG there: a histogram per round (+ the R1-vs-R2 scatter).
        export: write the per-sample table there (``.csv``, else parquet).
    """
    yield f"loss logs of {run_dir}: {table.num_rows} rows"
    ps = per_sample(table)  # one group-by, shared by every report below
    rows = summary(table, ps)
    per_token = [c for c in ("loss_per_token", "ce_per_token", "kl_per_token", "distill_per_token") if rows and c in rows[0]]
    yield _fmt(rows, ["round", "split", "rows", "samples", "tokens", *per_token, "p10", "p50", "p90"])
    rows = hardest(table, top, metric, ps).to_pylist()
    text = SampleText(run_dir)
    for r in rows:
        r["text"] = text(r["sample_id"], round_=r["round"])
    yield f"\nhardest {len(rows)} samples by {metric} per token:"
    yield _fmt(rows, ["round", "split", "sample_id", "visits", "n_tokens", f"{metric}_per_token", "text"])
    if compare:
        r1, r2 = compare
        moved = compare_rounds(table, r1, r2, metric=metric, samples=ps).slice(0, top).to_pylist()
        for r in moved:
            r["text"] = text(r["sample_id"])
        yield f"\n{len(moved)} samples that moved most from round {r1} to {r2} ({metric} per token, train):"
        cols = list(moved[0]) if moved else ["sample_id"]
        yield _fmt(moved, cols)
    if plot_path:
        plot(table, plot_path, metric, tuple(compare) if compare else None, ps)
        yield f"\nplot written to {plot_path}"
    if export:
        if export.endswith(".csv"):
            pacsv.write_csv(ps, export)
        else:
            pq.write_table(ps, export)
        yield f"\nper-sample table ({ps.num_rows} rows) written to {export}"
