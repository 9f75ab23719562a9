"""Typed, validated configuration for both stages.

Configs are YAML files plus ``key.sub=value`` command-line overrides. Every section is a
pydantic model with ``extra="forbid"``: an unknown key or a wrong type is a
:class:`ConfigError` whose one-line message names the dotted key. The resolved config is
written next to every output (``config.yaml``) so a run can be reproduced from it.

- :mod:`pipeline.config.loading`: the section base, YAML + overrides, errors, dumping;
- :mod:`pipeline.config.data`: the dataset section both stages share;
- :mod:`pipeline.config.precompute`: stage 1 (``precompute-teacher``);
- :mod:`pipeline.config.generate`: ``generate-completions`` (completions for sequence-level or on-policy KD);
- :mod:`pipeline.config.train`: stage 2 (``train-student``);
- :mod:`pipeline.config.rounds`: ``distill-rounds`` (generate → precompute → train, per round).
"""
from pipeline.config.loading import ConfigError, StorageOptions, load_config, config_dict, dump_config  # noqa: F401
from pipeline.config.data import DatasetConfig  # noqa: F401
from pipeline.config.precompute import TeacherConfig, CacheConfig, TargetsConfig, PrecomputeConfig  # noqa: F401
from pipeline.config.generate import SamplingConfig, GenerateConfig  # noqa: F401
from pipeline.config.rounds import StageBase, RoundPlan, DistillRoundsConfig  # noqa: F401
from pipeline.config.train import LORA_LLAMA_TARGETS, LoraConfig, StudentConfig, RouterLossConfig, LossConfig, ParamGroupConfig, OptimConfig, TrainCacheEntry, TrainDataConfig, EarlyStoppingConfig, LRFindConfig, SelectConfig, WandbConfig, CallbackConfig, TrainStudentConfig  # noqa: F401

__all__ = ['StageBase', 'RoundPlan', 'DistillRoundsConfig', 'ConfigError', 'StorageOptions', 'load_config', 'config_dict', 'dump_config', 'DatasetConfig', 'TeacherConfig', 'CacheConfig', 'TargetsConfig', 'PrecomputeConfig', 'SamplingConfig', 'GenerateConfig', 'LORA_LLAMA_TARGETS', 'LoraConfig', 'StudentConfig', 'RouterLossConfig', 'LossConfig', 'ParamGroupConfig', 'OptimConfig', 'TrainCacheEntry', 'TrainDataConfig', 'EarlyStoppingConfig', 'LRFindConfig', 'SelectConfig', 'WandbConfig', 'CallbackConfig', 'TrainStudentConfig']
