"""Reading the per-sample loss logs: summaries per round and split, hardest samples.

All work is done with pyarrow compute (vectorised group-bys), not Python loops over rows.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import yaml

from pipeline.losslog.writer import SCHEMA, unreadable_part
from pipeline.storage import Folder, join, one_line, read_file, store_error


def load_loss_logs(run_dir: str | os.PathLike, round_: int | None = None, split: str | None = None,
                   min_tokens: int | None = None) -> pa.Table:
    """All loss-log rows of a run as one table with the hive columns ``round``, ``split``, ``rank``,
    in the writer's schema (:data:`pipeline.losslog.writer.SCHEMA`; ``distill_sum`` of logs
    written before it existed is their ``kl_sum``: they were trained with forward KL).

    Raises:
        FileNotFoundError: the run has no ``loss_logs`` directory (prefix, on a store).
        ValueError: a part file is not readable parquet (truncated, overwritten): the file is
            named. Part files are never skipped silently (their rows would be missing from
            every report and from the next round's selection).
        StoreError: (store) a request failed: unreachable endpoint, refused credentials,
            missing bucket, throttling (the URL and the cause named).
    """
    logs = Folder(join(run_dir, "loss_logs"))
    rounds = [] if logs.isdir() else _round_log_dirs(run_dir)
    if not logs.isdir() and not rounds:  # on a store: the prefix exists
        raise FileNotFoundError(f"no loss logs in {run_dir} (expected {logs.path})")
    if rounds:  # a distill-rounds run: every round's student logs, one table
        tables = [load_loss_logs(d, round_, split, min_tokens) for d in rounds]
        return pa.concat_tables(tables)
    fs, root = logs.fs_path()
    part = pads.partitioning(pa.schema([("round", pa.int32()), ("split", pa.string()), ("rank", pa.int32())]), flavor="hive")
    flt = None
    for cond in ((pc.field("round") == round_) if round_ is not None else None,
                 (pc.field("split") == split) if split is not None else None,
                 (pc.field("n_tokens") >= min_tokens) if min_tokens is not None else None):
        if cond is not None:
            flt = cond if flt is None else flt & cond
    # the writer's schema, so logs written before a column existed read with it null
    schema = pa.schema(list(SCHEMA) + list(part.schema))
    try:  # temporary ``.part-*.tmp`` files start with "." and are ignored by the dataset
        table = pads.dataset(root, format="parquet", partitioning=part, filesystem=fs, schema=schema).to_table(filter=flt)
    except Exception as e:
        err = store_error(e, str(logs.url), getattr(fs, "retries", None)) if fs is not None else None
        if err is not None:  # unreachable endpoint, refused credentials, throttling... (named)
            raise err from None
        if not isinstance(e, (pa.ArrowInvalid, OSError)):
            raise
        if fs is not None:
            raise ValueError(f"loss logs in {join(run_dir, 'loss_logs')} unreadable: {one_line(e)}") from None
        raise ValueError(_unreadable_part(logs.dir, e)) from None
    # logs written before ``distill_sum`` existed were trained with forward KL: D = KL
    i = table.schema.get_field_index("distill_sum")
    return table.set_column(i, "distill_sum", pc.coalesce(table["distill_sum"], table["kl_sum"]))


def _round_log_dirs(run_dir: str | os.PathLike) -> list[str]:
    """The student directories ``round-R/student`` holding loss logs of a ``distill-rounds`` run
    (``rounds.json`` at its top), by round; ``[]`` for any other directory."""
    top = Folder(run_dir)
    if not top.isfile("rounds.json"):
        return []
    names = sorted((n for n in top.list() if n.startswith("round-") and n[6:].isdigit()), key=lambda n: int(n[6:]))
    return [join(run_dir, n, "student") for n in names if Folder(join(run_dir, n, "student", "loss_logs")).isdir()]


def missing_rounds(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """The rounds that a ``distill-rounds`` directory's ``rounds.json`` marks trained
    (``round-R/train`` complete) whose loss logs are gone: ``[(R, expected loss_logs
    directory)]``, by round; ``[]`` for any other directory.

    Raises:
        ValueError: ``rounds.json`` is not valid JSON (its path named).
    """
    import json

    raw = _read_text(join(run_dir, "rounds.json"))
    if raw is None:
        return []
    try:
        steps = json.loads(raw).get("steps", {})
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{join(run_dir, 'rounds.json')} is not a valid rounds state ({one_line(e)})") from None
    trained = sorted(int(k[6:-6]) for k, v in steps.items()
                     if k.startswith("round-") and k.endswith("/train") and k[6:-6].isdigit()
                     and isinstance(v, dict) and v.get("complete"))
    logs = {r: join(run_dir, f"round-{r}", "student", "loss_logs") for r in trained}
    return [(r, d) for r, d in logs.items() if not Folder(d).isdir()]


def _unreadable_part(log_dir: Path, err: Exception) -> str:
    """The message for a loss-log directory holding a part that is not parquet: names it."""
    import pyarrow.parquet as pq

    for f in sorted(log_dir.rglob("part-*.parquet")):
        try:
            pq.read_metadata(f)
        except (pa.ArrowInvalid, OSError) as e:
            return unreadable_part(f, e)
    return f"loss logs in {log_dir} unreadable: {' '.join(str(err).split())}"


METRICS = ("loss", "ce", "kl", "distill")
"""The per-token metrics of the loss logs: the ``{name}_sum`` columns."""


def _metrics(table: pa.Table) -> tuple[str, ...]:
    """The :data:`METRICS` whose ``{name}_sum`` column ``table`` has (``distill`` is missing
    from tables built by hand from logs written before it existed)."""
    return tuple(m for m in METRICS if f"{m}_sum" in table.column_names)


def per_sample(table: pa.Table, metrics: tuple[str, ...] | None = None,
               by: tuple[str, ...] = ("round", "split", "sample_id")) -> pa.Table:
    """The one per-sample aggregation of the loss logs (reports, round selection and
    loss-proportional sampling all use it).

    Args:
        table: loss-log rows (:data:`pipeline.losslog.writer.SCHEMA`).
        metrics: the ``{name}_sum`` columns to aggregate (default: every one of :data:`METRICS`
            in the table).
        by: the grouping keys; ``("sample_id",)`` for a table of one round and split.
    Returns:
        One row per group: the keys, ``visits``, ``n_tokens`` (summed), each ``{name}_sum``
        (summed over visits) and ``{name}_per_token`` = Σ{name}_sum / max(Σn_tokens, 1), float64 nats.
    """
    metrics = _metrics(table) if metrics is None else metrics
    g = table.group_by(list(by)).aggregate(
        [("sample_id", "count"), ("n_tokens", "sum")] + [(f"{name}_sum", "sum") for name in metrics])
    g = g.rename_columns(list(by) + ["visits", "n_tokens"] + [f"{name}_sum" for name in metrics])
    tok = pc.max_element_wise(pc.cast(g["n_tokens"], pa.float64()), 1.0)
    for name in metrics:
        g = g.append_column(f"{name}_per_token", pc.divide(pc.cast(g[f"{name}_sum"], pa.float64()), tok))
    return g


def summary(table: pa.Table, samples: pa.Table | None = None) -> list[dict]:
    """Per (round, split): rows, unique samples, tokens, loss/CE/KL/D per token (token-weighted),
    and the 10/50/90% quantiles of per-sample loss per token. ``samples``: ``per_sample(table)``
    when the caller already has it (computed once, reused by every report)."""
    agg = table.group_by(["round", "split"]).aggregate(
        [("sample_id", "count"), ("n_tokens", "sum")] + [(f"{m}_sum", "sum") for m in _metrics(table)])
    samples = per_sample(table) if samples is None else samples
    out = []
    for row in sorted(agg.to_pylist(), key=lambda x: (x["round"], x["split"])):
        r, s = row["round"], row["split"]
        ps = samples.filter((pc.field("round") == r) & (pc.field("split") == s))
        n = max(row["n_tokens_sum"] or 0, 1)
        q = np.quantile(ps["loss_per_token"].to_numpy(), [0.1, 0.5, 0.9])
        out.append({"round": r, "split": s, "rows": row["sample_id_count"], "samples": ps.num_rows,
                    "tokens": row["n_tokens_sum"],
                    **{f"{m}_per_token": row[f"{m}_sum_sum"] / n for m in _metrics(table)},
                    "p10": float(q[0]), "p50": float(q[1]), "p90": float(q[2])})
    return out


def hardest(table: pa.Table, n: int, metric: str = "loss", samples: pa.Table | None = None) -> pa.Table:
    """The ``n`` (round, split, sample) rows with the highest ``{metric}_per_token``."""
    ps = per_sample(table) if samples is None else samples
    return ps.sort_by([(f"{metric}_per_token", "descending")]).slice(0, n)


def compare_rounds(table: pa.Table, r1: int, r2: int, split: str = "train", metric: str = "loss",
                   samples: pa.Table | None = None) -> pa.Table:
    """Samples present in both rounds with ``{metric}_per_token`` in each and ``delta = r2 - r1``,
    sorted by ``|delta|`` descending (the samples that moved most)."""
    ps = (per_sample(table) if samples is None else samples).filter(pc.field("split") == split)
    col = f"{metric}_per_token"
    a = ps.filter(pc.field("round") == r1).select(["sample_id", col]).rename_columns(["sample_id", f"{col}_r{r1}"])
    b = ps.filter(pc.field("round") == r2).select(["sample_id", col]).rename_columns(["sample_id", f"{col}_r{r2}"])
    j = a.join(b, "sample_id", join_type="inner")
    j = j.append_column("delta", pc.subtract(j[f"{col}_r{r2}"], j[f"{col}_r{r1}"]))
    j = j.append_column("abs_delta", pc.abs(j["delta"]))
    return j.sort_by([("abs_delta", "descending")]).drop_columns(["abs_delta"])


def plot(table: pa.Table, path: str | os.PathLike, metric: str = "loss", compare: tuple[int, int] | None = None,
         samples: pa.Table | None = None) -> None:
    """Histogram of per-sample ``{metric}`` per token, one curve per (round, split); with
    ``compare`` a second panel scatters round r1 against r2 per sample. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = per_sample(table) if samples is None else samples
    col = f"{metric}_per_token"
    fig, axes = plt.subplots(1, 2 if compare else 1, figsize=(11 if compare else 6, 4), squeeze=False)
    ax = axes[0][0]
    for r, s in sorted(set(zip(ps["round"].to_pylist(), ps["split"].to_pylist()))):
        vals = ps.filter((pc.field("round") == r) & (pc.field("split") == s))[col].to_numpy()
        ax.hist(vals, bins=50, histtype="step", label=f"round {r} {s}")
    ax.set(xlabel=f"{metric} per token (nats)", ylabel="samples", title="per-sample loss")
    ax.legend()
    if compare:
        c = compare_rounds(table, *compare, metric=metric, samples=ps)
        ax = axes[0][1]
        x, y = c.column(1).to_numpy(), c.column(2).to_numpy()
        ax.scatter(x, y, s=4, alpha=0.5)
        lim = [min(x.min(), y.min()), max(x.max(), y.max())]
        ax.plot(lim, lim, c="gray", lw=1)
        ax.set(xlabel=f"round {compare[0]}", ylabel=f"round {compare[1]}", title=f"{metric} per token, train")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _read_text(path: str) -> str | None:
    """A small local file or store object as text; None when there is none."""
    try:
        return read_file(path).decode()
    except (FileNotFoundError, IsADirectoryError):
        return None


class SampleText:
    """Decodes sample IDs to text through the caches and tokenizer recorded in a run's config."""

    def __init__(self, run_dir: str | os.PathLike):
        from pipeline.cache import open_cache

        # a distill-rounds run: one decoder per round's student directory (its own caches)
        self.rounds = {int(Path(d).parent.name[6:]): SampleText(d) for d in _round_log_dirs(run_dir)}
        from pipeline.models import load_tokenizer

        data = (yaml.safe_load(_read_text(join(run_dir, "config.yaml")) or "") or {}).get("data", {})
        mixed = [c["path"] for c in data.get("train_caches") or []]
        # (prefix, cache path): a mixture's IDs are "{c}:{id}" (pipeline/cache/mixture.py)
        sources = ([(f"{c}:", p) for c, p in enumerate(mixed)] if len(mixed) > 1
                   else [("", mixed[0] if mixed else data.get("train_cache"))])
        sources.append(("", data.get("eval_cache")))
        self.readers = []
        for prefix, path in sources:
            folder = Folder(path) if path else None  # a store has no directories: the manifest tells
            if folder is not None and (folder.isfile("manifest.json") if folder.is_remote else folder.isdir()):
                self.readers.append((prefix, open_cache(path, allow_incomplete=True, verify=False)))
        # the run's exported student, else the tokenizer stored in the cache (multi-round runs
        # keep their students under round-R/)
        candidates = [join(run_dir, "final")] + [join(p, "tokenizer") for _, p in sources if p]
        tok_dir = next((c for c in candidates if _read_text(join(c, "tokenizer_config.json")) is not None), None)
        if tok_dir is not None:
            tok_dir = Folder(tok_dir).local()  # a store's: downloaded once
        self.tokenizer = load_tokenizer(tok_dir) if tok_dir is not None else None

    def __call__(self, sample_id: str, max_chars: int = 80, round_: int | None = None) -> str:
        """The sample's text (at most ``max_chars``), ``""`` when no cache holds it; in a
        distill-rounds run, through round ``round_``'s caches (the same completion ID holds
        another completion in every round), else the first round that has it."""
        if self.rounds:
            order = [round_] if round_ in self.rounds else sorted(self.rounds)
            return next((t for t in (self.rounds[r](sample_id, max_chars) for r in order) if t), "")
        for prefix, r in self.readers:
            if not sample_id.startswith(prefix):
                continue
            try:
                ids = r[r.index_of(sample_id[len(prefix):])].input_ids
            except KeyError:
                continue
            text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else str(ids[:20])
            text = " ".join(text.split())
            return text[:max_chars] + ("…" if len(text) > max_chars else "")
        return ""


def logged_rounds(run_dir: str | os.PathLike) -> dict[int, list[str]]:
    """``{round: [splits]}`` that a run's loss logs hold (their ``round=R/split=S``
    directories, or prefixes on a store; for a ``distill-rounds`` directory, those of every
    round's student), sorted; ``{}`` when there are none.

    Raises:
        StoreError: (store) a listing failed (the URL and the cause named).
    """
    logs = Folder(join(run_dir, "loss_logs"))
    out: dict[int, list[str]] = {}
    for name in logs.list():
        key, _, value = name.partition("=")
        if key == "round" and value.lstrip("-").isdigit():
            splits = [s.partition("=")[2] for s in logs.sub(name).list() if s.startswith("split=")]
            out[int(value)] = sorted(s for s in splits if s)
    if not out:  # a distill-rounds run: each round's student holds its own logs
        for d in _round_log_dirs(run_dir):
            for r, splits in logged_rounds(d).items():
                out[r] = sorted(set(out.get(r, [])) | set(splits))
    return dict(sorted(out.items()))


def check_selection(run_dir: str | os.PathLike, round_: int | None = None, split: str | None = None,
                    compare: tuple[int, int] | None = None) -> None:
    """Check that the rounds and the split an ``inspect-losses`` call names exist in the run's
    loss logs (:func:`logged_rounds`), before reading them: a name that does not is reported
    with what exists instead of an empty report.

    Args:
        round_: ``--round``; split: ``--split``; compare: ``--compare R1 R2`` (train split).
    Raises:
        FileNotFoundError: the run has no loss logs (the expected directory named).
        ValueError: a round or split not in the logs, one line naming it and listing what is
            there (e.g. ``round 5 not in runs/x/loss_logs (rounds: 0, 1)``); ``--compare`` with
            a round without train rows, or with ``--round`` / ``--split`` leaving its rows out.
        StoreError: (store) a listing failed.
    """
    logs = join(run_dir, "loss_logs")
    have = logged_rounds(run_dir)
    if not have:
        raise FileNotFoundError(f"no loss logs in {run_dir} (expected {logs}"
                                f"{': no such prefix' if Folder(logs).is_remote else ''})")

    def listed(xs) -> str:
        return ", ".join(str(x) for x in xs) or "none"

    if round_ is not None and round_ not in have:
        raise ValueError(f"round {round_} not in {logs} (rounds: {listed(have)})")
    if split is not None:
        splits = have[round_] if round_ is not None else sorted({s for ss in have.values() for s in ss})
        if split not in splits:
            where = f"round {round_} of {logs}" if round_ is not None else logs
            raise ValueError(f"split {split} not in {where} (splits: {listed(splits)})")
    if compare:
        train = [r for r, ss in have.items() if "train" in ss]
        for r in compare:
            if r not in train:
                raise ValueError(f"--compare: round {r} has no train rows in {logs} (rounds with train rows: "
                                 f"{listed(train)})")
        if round_ is not None and set(compare) != {round_}:
            raise ValueError(f"--compare {compare[0]} {compare[1]} reads rounds {compare[0]} and {compare[1]}, but "
                             f"--round {round_} keeps only round {round_}: drop --round")
        if split is not None and split != "train":
            raise ValueError(f"--compare reads the train split, but --split {split} leaves it out: drop --split")


def check_metric(table: pa.Table, metric: str, run_dir: str | os.PathLike) -> None:
    """Check that the loss-log rows have the ``{metric}_sum`` column that ``--metric`` names.

    Raises:
        ValueError: it has not; one line naming the column and listing the table's columns
            (logs written before a column existed do not have it).
    """
    if f"{metric}_sum" not in table.column_names:
        raise ValueError(f"column {metric}_sum (--metric {metric}) not in the loss logs of {run_dir} "
                         f"(columns: {', '.join(table.column_names)})")
