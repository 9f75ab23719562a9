"""Configuration of ``distill-rounds``: on-policy (or sequence-level) distillation in rounds, each
round ``generate-completions`` → ``precompute-teacher`` → ``train-student`` from the stages' own
configs plus per-round overrides."""
from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from pipeline.config.loading import _local_only, _Section
from pipeline.config.train import TrainCacheEntry


class StageBase(_Section):
    """One stage's base config: its YAML file plus overrides applied in every round."""

    config: str
    """Path of the stage's YAML config (relative paths inside it are resolved by the stage as
    usual: from the working directory)."""
    _local = field_validator("config")(_local_only)
    overrides: dict = Field(default_factory=dict)
    """Nested overrides merged over the YAML (dicts merge key by key, anything else replaces)."""


class RoundPlan(_Section):
    """What one round does differently: the model that generates, the train mix, and overrides
    of the three stage configs (merged over the base configs and their overrides)."""

    model: str = "student"
    """The generating model: ``student`` (round r-1's ``final/``; in round 0 the base train
    config's ``student.path``), ``teacher`` (``teacher`` below) or a model directory."""
    generated_weight: float = Field(default=1.0, gt=0)
    """Weight of this round's cache (the teacher's targets on the generated completions) in
    ``data.train_caches``."""
    extra_caches: list[TrainCacheEntry] = Field(default_factory=list)
    """More caches mixed in with their weights, e.g. the human-text cache of off-policy KD:
    ``[{path: runs/human-cache, weight: 1.0}]`` with ``generated_weight: 1.0`` is a 50/50 mix
    (GKD's λ = 0.5)."""
    generate: dict = Field(default_factory=dict)
    """Overrides of the generate-completions config of this round (``model`` and
    ``output_dir`` are the driver's)."""
    precompute: dict = Field(default_factory=dict)
    """Overrides of the precompute-teacher config of this round (``cache.dir`` and
    ``dataset.path`` are the driver's)."""
    train: dict = Field(default_factory=dict)
    """Overrides of the train-student config of this round (``output_dir``, ``round``,
    ``data.train_caches`` and, after round 0, ``student.path`` are the driver's)."""


class DistillRoundsConfig(_Section):
    """``distill-rounds``: run ``rounds`` rounds of generate → precompute-teacher → train-student."""

    output_dir: str
    """Local run directory: ``rounds.json``, ``config.yaml`` and ``round-R/`` with the round's
    stage configs and ``generated/``, ``cache/``, ``student/``."""
    _local_out = field_validator("output_dir")(_local_only)
    nproc_per_node: int = Field(default=1, ge=1)
    """Processes per stage: > 1 runs each stage under ``torchrun --standalone --nproc_per_node``."""
    rounds: int = Field(ge=1)
    """Number of rounds (numbered 0 ... rounds-1)."""
    teacher: str | None = None
    """Model directory of ``model: teacher``; default the first of the precompute config's
    ``teachers``."""
    generate: StageBase
    """The generate-completions base config (its ``dataset`` holds the prompts)."""
    precompute: StageBase
    """The precompute-teacher base config (its teachers score the completions; its ``dataset``
    section is replaced by the round's generated dataset, keeping ``max_length``)."""
    train: StageBase
    """The train-student base config (``student.path`` of it is the round-0 student)."""
    default_round: RoundPlan = Field(default_factory=RoundPlan)
    """What every round does unless ``per_round`` says otherwise."""
    per_round: list[dict] = Field(default_factory=list)
    """Per round r, overrides of ``default_round`` (merged key by key; at most ``rounds``
    entries, missing ones mean no override), e.g. ``[{model: teacher}, {}]``."""

    @model_validator(mode="after")
    def _per_round_fits(self) -> "DistillRoundsConfig":
        if len(self.per_round) > self.rounds:
            raise ValueError(f"per_round has {len(self.per_round)} entries for rounds={self.rounds}")
        return self
