"""The configs of every round's three steps, built from the stages' base configs, the round's
plan and the run layout; each step's completion marker and command line."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from pipeline.config.loading import read_yaml_mapping
from pipeline.rounds_driver.checks import check_inputs
from pipeline.config import (ConfigError, DistillRoundsConfig, GenerateConfig, PrecomputeConfig, RoundPlan,
                             TrainStudentConfig)

STEPS = ("generate", "precompute", "train")
"""The steps of a round, in order."""
STEP_DIRS = {"generate": "generated", "precompute": "cache", "train": "student"}
"""Each step's output directory under ``round-R/``."""
STAGES = {"generate": ("stages.generate_completions", GenerateConfig),
          "precompute": ("stages.precompute_teacher", PrecomputeConfig),
          "train": ("stages.train_student", TrainStudentConfig)}
"""Each step's stage module (run as ``python -m``) and config class."""


def merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: dicts key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _load_base(key: str, stage) -> dict:
    """A stage's base YAML with its ``overrides``. Raises ConfigError naming the key or file."""
    if not Path(stage.config).is_file():
        raise ConfigError(f"config key '{key}.config': no such file {stage.config}")
    return merge(read_yaml_mapping(stage.config), stage.overrides)


def _validated(cls, tree: dict, where: str):
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ConfigError(f"{where}: config key '{key}': {first['msg'].replace('Value error, ', '')}") from None


def round_dir(cfg: DistillRoundsConfig, r: int) -> Path:
    """``output_dir/round-r``."""
    return Path(cfg.output_dir) / f"round-{r}"


def _generating_model(cfg: DistillRoundsConfig, plan: RoundPlan, r: int, pre: dict, train: dict) -> str:
    if plan.model == "teacher":
        return cfg.teacher or pre["teachers"][0]["path"]
    if plan.model != "student":
        return plan.model
    if r > 0:
        return str(round_dir(cfg, r - 1) / STEP_DIRS["train"] / "final")
    if train["student"].get("init", "random") != "pretrained":
        raise ConfigError("round 0 generates from the student (model: student) but the train config's student is "
                          "random (student.init); give a pretrained student or per_round[0].model")
    return train["student"]["path"]


def _longest_row(gen: GenerateConfig) -> tuple[int, str]:
    """The most tokens a generated row (prompt + completion) can have, and how: the longest
    prompt kept (``prompt_tokens`` for text rows, else ``dataset.max_length``: longer prompts
    are skipped) plus ``sampling.max_new_tokens``."""
    if gen.dataset.format == "text" and gen.prompt_tokens < gen.dataset.max_length:
        n, prompt = gen.prompt_tokens, f"prompt_tokens {gen.prompt_tokens}"
    else:
        n, prompt = gen.dataset.max_length, f"dataset.max_length {gen.dataset.max_length}"
    new = gen.sampling.max_new_tokens
    return n + new, f"generate's {prompt} + sampling.max_new_tokens {new}"


def round_configs(cfg: DistillRoundsConfig) -> list[dict]:
    """Per round, ``{step: validated stage config}`` for the three steps (all rounds are built,
    and so checked, before anything runs).

    Round r: generate from the plan's model into ``round-r/generated`` (``sampling.seed`` + r
    unless the round sets it); precompute ``round-r/cache`` from that dataset (format
    ``generated``; ``dataset.max_length`` the longest row generation can write unless set,
    :func:`_longest_row`); train ``round-r/student`` on
    ``[{round-r/cache, generated_weight}] + extra_caches`` with ``round: r``, from round r-1's
    ``final/`` (pretrained) after round 0.

    Raises:
        ConfigError: a missing or invalid base YAML, a ``per_round[r]`` or stage key that does
            not validate (named with its round), round 0 generating from a random student, a
            precompute ``dataset.max_length`` shorter than the longest generated row (which
            would be cut), an input path that does not exist (:func:`check_inputs`).
    """
    bases = {s: _load_base(s, getattr(cfg, s)) for s in STEPS}
    default = cfg.default_round.model_dump()
    out = []
    for r in range(cfg.rounds):
        plan = _validated(RoundPlan, merge(default, cfg.per_round[r] if r < len(cfg.per_round) else {}),
                          f"per_round[{r}]")
        d = round_dir(cfg, r)
        gen, pre, train = (merge(bases[s], getattr(plan, s)) for s in STEPS)
        if "seed" not in plan.generate.get("sampling", {}):
            gen.setdefault("sampling", {})["seed"] = int(gen.get("sampling", {}).get("seed", 0)) + r
        gen.update(model=_generating_model(cfg, plan, r, pre, bases["train"]), output_dir=str(d / "generated"))
        gen_cfg = _validated(GenerateConfig, gen, f"round {r} generate config")
        longest, why = _longest_row(gen_cfg)
        max_len = plan.precompute.get("dataset", {}).get("max_length",
                                                         bases["precompute"].get("dataset", {}).get("max_length"))
        if isinstance(max_len, int) and max_len < longest:  # completions cut: refused, never silent
            raise ConfigError(f"round {r} precompute config: config key 'dataset.max_length' is {max_len}, "
                              f"shorter than the longest generated row ({longest} tokens: {why}); raise it to "
                              f"{longest} or leave it unset (then it is {longest})")
        pre["dataset"] = merge({"path": str(d / "generated"), "format": "generated"},
                               plan.precompute.get("dataset", {}))
        pre["dataset"]["max_length"] = longest if max_len is None else max_len
        pre.setdefault("cache", {})["dir"] = str(d / "cache")
        data = {k: v for k, v in train.get("data", {}).items() if k not in ("train_cache", "train_caches", "train_dataset")}
        data["train_caches"] = [{"path": str(d / "cache"), "weight": plan.generated_weight}] + \
            [c.model_dump() for c in plan.extra_caches]
        train.update(data=data, output_dir=str(d / "student"), round=r, rounds=[])
        if r > 0:
            train["student"] = {**train["student"], "path": str(round_dir(cfg, r - 1) / "student" / "final"),
                                "init": "pretrained"}
        trees = {"generate": gen, "precompute": pre, "train": train}
        out.append({s: _validated(STAGES[s][1], trees[s], f"round {r} {s} config") for s in STEPS})
    made = {str(round_dir(cfg, r) / x)  # what the rounds write: the inputs of later rounds
            for r in range(cfg.rounds) for x in ("generated", "cache", "student", "student/final")}
    check_inputs(out, made)
    return out


def step_complete(step: str, out: Path) -> bool:
    """Whether the stage's own completion marker exists in its output directory ``out``:
    ``generation.json`` with ``complete: true``; the cache's ``manifest.json`` with ``complete:
    true``; the student's ``summary.json`` with an outcome other than ``preempted`` and
    ``final/config.json`` (the export's last file)."""
    try:
        if step == "generate":
            return bool(json.loads((out / "generation.json").read_text()).get("complete"))
        if step == "precompute":
            return bool(json.loads((out / "manifest.json").read_text()).get("complete"))
        summary = json.loads((out / "summary.json").read_text())
        return summary.get("outcome") != "preempted" and (out / "final" / "config.json").is_file()
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return False


def command(step: str, config_path: Path, nproc: int) -> list[str]:
    """The step's command: ``python -m MODULE --config FILE``, under ``torchrun --standalone
    --nproc_per_node=N`` when ``nproc`` > 1 (the interpreter running the driver)."""
    module = STAGES[step][0]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                "-m", module, "--config", str(config_path)]
    return [sys.executable, "-m", module, "--config", str(config_path)]
