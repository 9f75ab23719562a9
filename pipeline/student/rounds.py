"""Multi-round runs: per-round configs, sample selection from the previous round's loss log,
``run.json``.

Layout of a multi-round run directory::

    run.json                          finished rounds and the current one
    loss_logs/round=R/...             every round's per-sample rows (one table for inspect-losses)
    round-R/                          that round's config.yaml, checkpoints/, best/, final/, summary.json
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np

from pipeline.config import ConfigError, SelectConfig, TrainStudentConfig
from pipeline.losslog.reader import per_sample
from pipeline.storage.errors import writing
from pipeline.storage import join, read_file, write_file


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def round_configs(cfg: TrainStudentConfig) -> list[TrainStudentConfig]:
    """One validated config per round: ``rounds[r]`` merged over the base config, with
    ``round=r``, ``output_dir=<run>/round-r`` and, for r > 0, the student initialised from
    round r-1's ``final/``.

    Raises:
        ConfigError: a round override with an unknown key or a wrong type (names ``rounds[r]``).
    """
    base = cfg.model_dump(mode="json")
    base["rounds"] = []
    out = []
    for r, over in enumerate(cfg.rounds):
        tree = _merge(base, over)
        tree.update(round=r, output_dir=join(cfg.output_dir, f"round-{r}"))
        if r > 0:
            # a LoRA run keeps its adapter config: round r trains fresh adapters on round r-1's
            # merged export (``final/`` is base + adapters, pipeline/student/lora.py)
            tree["student"] = {**tree["student"], "path": join(cfg.output_dir, f"round-{r - 1}", "final"),
                               "init": "pretrained"}
        try:
            out.append(TrainStudentConfig.model_validate(tree))
        except Exception as e:  # pydantic ValidationError: report the round and the key
            first = e.errors()[0] if hasattr(e, "errors") else {"loc": (), "msg": str(e)}
            key = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"config key 'rounds[{r}].{key}': {first['msg']}") from None
    return out


def finite_rows(table, metrics) -> tuple:
    """The rows of a loss-log table whose ``{metric}_sum`` is finite for every metric in
    ``metrics``, and how many rows were left out. A step skipped as non-finite
    (``skip_nonfinite``) logs its samples with NaN or inf; such a row says nothing about the
    sample, and NaN would sort above every number in a ranking.

    Args:
        table: loss-log rows (``{metric}_sum`` columns, float).
        metrics: names such as ``"kl"``, ``"loss"``.
    Returns:
        ``(table of the finite rows, number of rows left out)``; a null counts as not finite.
    """
    import pyarrow.compute as pc

    keep = None
    for m in dict.fromkeys(metrics):
        ok = pc.fill_null(pc.is_finite(table[f"{m}_sum"]), False)
        keep = ok if keep is None else pc.and_(keep, ok)
    if keep is None:
        return table, 0
    kept = table.filter(keep)
    return kept, table.num_rows - kept.num_rows


def select_sample_ids(table, select: SelectConfig, seed: int = 0, round_: int = 0) -> list[str]:
    """Sample IDs chosen by ``select`` from a (round, train) loss-log table.

    Per sample the metric is Σ{metric}_sum / Σn_tokens over its visits. ``top_fraction`` keeps
    the ``ceil(fraction · N)`` highest (ties broken by sample ID), ``threshold`` those ≥ it,
    ``quantile [lo, hi]`` those between the two quantiles (inclusive), ``random_fraction``
    ``ceil(fraction · N)`` drawn uniformly without replacement by
    ``numpy.random.default_rng([seed, round_])`` from the sample IDs in sorted order (the same
    on every rank and every rerun; the metric is not used). Sorted by sample ID. Rows whose
    metric is not finite (steps skipped as non-finite) are left out first (:func:`finite_rows`):
    a sample only ever logged so is not selected.

    Args:
        table: loss-log rows of one round's train split (``sample_id``, ``n_tokens``, ``{metric}_sum``).
        select: the criterion. seed: the run's ``seed``. round_: the round being selected for.
    Returns:
        The chosen sample IDs, sorted.
    """
    table, _ = finite_rows(table, (select.metric,))
    g = per_sample(table, (select.metric,), by=("sample_id",))
    ids = np.array(g["sample_id"].to_pylist(), dtype=object)
    per_tok = g[f"{select.metric}_per_token"].to_numpy()
    if select.random_fraction is not None:
        n = int(np.ceil(select.random_fraction * len(ids)))
        order = np.argsort(ids)  # a draw that does not depend on the table's row order
        keep = order[np.random.default_rng([seed, round_]).choice(len(ids), size=n, replace=False)]
    elif select.top_fraction is not None:
        n = int(np.ceil(select.top_fraction * len(ids)))
        order = sorted(range(len(ids)), key=lambda i: (-per_tok[i], ids[i]))
        keep = order[:n]
    elif select.threshold is not None:
        keep = np.nonzero(per_tok >= select.threshold)[0]
    else:
        lo, hi = np.quantile(per_tok, select.quantile)
        keep = np.nonzero((per_tok >= lo) & (per_tok <= hi))[0]
    return sorted(ids[i] for i in keep)


def sample_weights(table, sample_ids: list[str], metric: str) -> np.ndarray:
    """(len(sample_ids),) float64 per-token ``metric`` of each sample in a loss-log table, for
    loss-proportional sampling; samples absent from the log (or logged only by steps skipped as
    non-finite, :func:`finite_rows`) get the mean weight."""
    table, _ = finite_rows(table, (metric,))
    g = per_sample(table, (metric,), by=("sample_id",))
    per_tok = g[f"{metric}_per_token"].to_numpy()
    lookup = dict(zip(g["sample_id"].to_pylist(), per_tok))
    mean = float(per_tok.mean()) if len(per_tok) else 1.0
    return np.maximum(np.array([lookup.get(s, mean) for s in sample_ids], dtype=np.float64), 1e-12)


def read_run_json(run_dir: str | os.PathLike) -> dict:
    """The run's ``run.json`` (``{"rounds": [finished rounds], "current": r}``), or a fresh one."""
    try:
        return json.loads(read_file(join(run_dir, "run.json")))
    except FileNotFoundError:
        return {"rounds": [], "current": 0}


def write_run_json(run_dir: str | os.PathLike, state: dict) -> None:
    """Replace ``run.json`` atomically (temporary file and rename; on a store one PUT): the
    previous run.json stays as it was on an error."""
    path = join(run_dir, "run.json")
    with writing("the run state", path):
        write_file(path, json.dumps(state, indent=1).encode())
