"""What ``distill-rounds`` checks before round 0 runs, beyond each stage config's own validation:
that every round's inputs exist (models, teachers, caches, tokenizers not made by an earlier
round), and that a rerun runs the configs its earlier steps ran (:func:`check_recorded`)."""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import ConfigError, config_dict
from pipeline.storage import Folder, is_remote


def _local_missing(path: str | None, made: set[str]) -> bool:
    """Whether ``path`` is a local path that does not exist and no earlier round makes."""
    return path is not None and not is_remote(path) and path not in made and not Path(path).exists()


def _looks_local(path: str) -> bool:
    """A dataset path that is meant as a local file (not a hub name), as ``load_rows`` decides."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).exists()


def check_inputs(rounds: list[dict], made: set[str]) -> None:
    """Every round's input paths exist, so that no round stops for a missing input after the
    rounds before it have run: generate's ``model``, ``tokenizer`` and prompt ``dataset.path``;
    precompute's ``teachers[i].path`` and ``tokenizer``; train's ``student.path``, ``data.tokenizer``,
    the ``data.train_caches`` and ``data.eval_cache``. Paths in ``made`` (written by an earlier
    round: its generated data, cache, student) and URLs (checked by the stage) are skipped.

    Args:
        rounds: per round, ``{step: validated stage config}`` (:func:`~pipeline.rounds_driver.plan.round_configs`).
        made: the paths the rounds write, as strings.
    Raises:
        ConfigError: the first missing path, one line naming the round, the step, the key and
            the path.
    """
    for r, steps in enumerate(rounds):
        gen, pre, train = steps["generate"], steps["precompute"], steps["train"]
        keys = [("generate", "model", gen.model), ("generate", "tokenizer", gen.tokenizer)]
        if _looks_local(gen.dataset.path):
            keys.append(("generate", "dataset.path", gen.dataset.path))
        keys += [("precompute", f"teachers.{i}.path", t.path) for i, t in enumerate(pre.teachers)]
        keys += [("precompute", "tokenizer", pre.tokenizer), ("train", "student.path", train.student.path),
                 ("train", "data.tokenizer", train.data.tokenizer), ("train", "data.eval_cache", train.data.eval_cache)]
        keys += [("train", f"data.train_caches.{i}.path", c.path) for i, c in enumerate(train.data.train_caches or [])]
        for step, key, path in keys:
            if _local_missing(path, made):
                raise ConfigError(f"round {r} {step} config: config key '{key}': no such file or directory {path} "
                                  "(every round's inputs are checked before round 0 runs)")


def first_difference(old, new, key: str = "") -> tuple[str, object, object] | None:
    """The first key (dotted, list items by index) whose value differs between two plain
    config trees, with both values (``None`` where a key is absent); None when they are equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            d = first_difference(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
            if d is not None:
                return d
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            d = first_difference(a, b, f"{key}.{i}" if key else str(i))
            if d is not None:
                return d
        return None
    return None if old == new else (key or "<root>", old, new)


def check_recorded(rounds: list[dict], round_dir) -> None:
    """A rerun runs what its earlier attempt ran: each step that has started before (its
    resolved config ``round-R/STEP.yaml`` was written) must resolve to the same config now;
    steps that never started may change.

    Args:
        rounds: per round, ``{step: validated stage config}``.
        round_dir: ``r -> Path`` of round r's directory.
    Raises:
        ConfigError: one line naming the round, the step, the first differing key with both
            values, and the way out (``--restart``, or the old config back).
    """
    for r, steps in enumerate(rounds):
        for step, cfg in steps.items():
            path = Path(round_dir(r)) / f"{step}.yaml"
            if not path.is_file():
                continue
            try:
                old = yaml.safe_load(path.read_text())
            except yaml.YAMLError:
                old = None  # unreadable: it differs from anything
            new = yaml.safe_load(yaml.safe_dump(config_dict(cfg), sort_keys=False))  # as written
            diff = first_difference(old, new)
            if diff is not None:
                key, a, b = diff
                raise ConfigError(f"round {r} {step} config: config key '{key}' is {b!r} now but {a!r} in the run's "
                                  f"recorded {path}: rerun with the config that started the run, or add --restart "
                                  "to start the run over (deletes its rounds)")


def start_over(out: Path, log) -> None:
    """``--restart``: delete what ``distill-rounds`` wrote in ``out`` (``rounds.json``,
    ``config.yaml``, the ``round-R/`` directories) so that every round runs again."""
    folder = Folder(out)
    gone = [n for n in folder.list()
            if n in ("rounds.json", "config.yaml") or (n.startswith("round-") and n[6:].isdigit())]
    for name in gone:
        folder.remove(name)
    if gone:
        log(f"[rounds] --restart: removed {', '.join(gone)} from {out}")
