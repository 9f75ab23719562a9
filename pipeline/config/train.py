"""Stage-2 configuration: ``train-student`` (student, loss, optimizer, data, evaluation,
checkpoints, rounds, callbacks, wandb)."""
from __future__ import annotations

import os
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from pipeline.storage import is_remote
from pipeline.config.data import DatasetConfig
from pipeline.config.loading import (StorageOptions, _apply_storage_options, _file_url_to_path, _local_only,
                                     _Section)

LORA_LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
"""Default ``student.lora.target_modules``: the attention and MLP projections of Llama-like
models (Llama, Mistral, Qwen2, Gemma, Phi-3 after its fused names are split...)."""


class LoraConfig(_Section):
    """LoRA adapters (Hu et al. 2021, arXiv:2106.09685) on a frozen pretrained student, made
    with peft: each target linear layer computes ``W x + (alpha / r) * B A x`` with A (r, in)
    and B (out, r) trained, W frozen."""

    r: int = Field(default=8, ge=1)
    """Rank of the update ``B A``."""
    alpha: float = Field(default=16.0, gt=0)
    """Scale numerator: the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with
    ``rslora``)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapter's input (peft ``lora_dropout``)."""
    target_modules: list[str] | Literal["all-linear"] = Field(default_factory=lambda: list(LORA_LLAMA_TARGETS))
    """Linear layers that get adapters, matched as peft matches them (a module whose name is
    the entry or ends with ``.entry``), or ``all-linear`` (every linear layer of the blocks).
    The output layer is never a target (it runs inside the fused loss)."""
    modules_to_save: list[str] = Field(default_factory=list)
    """Modules trained in full beside the adapters (e.g. ``[embed_tokens]``), matched as peft
    does (module names ending with the entry); exported in the adapter directory so peft's
    ``PeftModel.from_pretrained`` restores them."""
    rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski 2023, arXiv:2312.03732)."""
    init: Literal["default", "gaussian"] = "default"
    """Initialisation of A (B is zero, so training starts at the base model): ``default``
    kaiming-uniform as ``nn.Linear`` (peft ``init_lora_weights=True``), ``gaussian`` N(0, 1/r)."""


class StudentConfig(_Section):
    """The student model."""

    path: str
    """HF model directory, or a directory / ``config.json`` with only a config. A URL only with
    ``init: pretrained`` (a previous round's ``final/`` on a store: downloaded once)."""
    init: Literal["random", "pretrained"] = "random"
    """``random``: build from the config with the run seed; ``pretrained``: load weights."""
    _file_path = field_validator("path")(_file_url_to_path)
    lora: LoraConfig | None = None
    """Train LoRA adapters on the frozen pretrained student (pipeline/student/lora.py); None: train
    every parameter. Needs ``init: pretrained``; exclusive with ``peft_config``."""
    peft_config: str | None = None
    """A saved peft LoRA adapter config (a directory with ``adapter_config.json``, or that
    file) instead of ``lora``: its r, alpha, dropout, target and ``modules_to_save`` are used
    (adapter weights in the directory are not loaded). Needs ``init: pretrained``."""
    _peft_local = field_validator("peft_config")(_local_only)

    @model_validator(mode="after")
    def _url_only_pretrained(self) -> "StudentConfig":
        if is_remote(self.path) and self.init != "pretrained":
            raise ValueError(f"student.path {self.path} is a URL: only a pretrained student (init: pretrained) "
                             "is read from a store")
        if self.lora is not None and self.peft_config is not None:
            raise ValueError("student.lora and student.peft_config: give exactly one of them")
        if (self.lora is not None or self.peft_config is not None) and self.init != "pretrained":
            key = "student.lora" if self.lora is not None else "student.peft_config"
            raise ValueError(f"{key} needs student.init: pretrained (adapters on a base of random weights "
                             "learn nothing the base could not)")
        return self


class RouterLossConfig(_Section):
    """Mixture-of-experts router losses by name (formulas and sources: pipeline/student/router_losses.py).
    Any coefficient > 0 requests ``output_router_logits=True`` from the student; each term is
    computed per MoE layer over the valid positions, summed over layers, and enters the loss per
    valid token of the optimizer step (like the main loss), logged as ``train/router_{name}``."""

    load_balance_coef: float = Field(default=0.0, ge=0)
    """Switch Transformer load-balancing loss ``E · Σ_e f_e · P_e`` (top-k as in Mixtral); 0 = off."""
    z_loss_coef: float = Field(default=0.0, ge=0)
    """ST-MoE router z-loss ``mean logsumexp(router_logits)²``; 0 = off."""
    auxiliary_coef: float = Field(default=0.0, ge=0)
    """Deviation of the mean router probability from uniform, ``E · Σ_e (P_e − 1/E)²``; 0 = off."""

    @property
    def enabled(self) -> bool:
        return self.load_balance_coef > 0 or self.z_loss_coef > 0 or self.auxiliary_coef > 0


class LossConfig(_Section):
    """Hybrid loss ``alpha * CE + (1 - alpha) * temperature**2 * D`` with ``D`` the divergence
    (forward KL by default; DESIGN.md, Loss)."""

    alpha: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=1.0, gt=0)
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd", "akl"] = \
        "forward_kl"
    """The distillation term ``D(p, q)`` between the teacher ``p`` and the student ``q`` over the
    tail mode's categories (formulas and sources in pipeline/student/divergences.py):
    ``forward_kl`` (mode-covering), ``reverse_kl`` (mode-seeking), ``jsd`` (generalised
    Jensen-Shannon with ``beta``), ``skew_forward_kl`` / ``skew_reverse_kl`` (with ``skew``),
    ``tvd`` (total variation) or ``akl`` (adaptive forward/reverse mix, with ``akl_mu``).
    Sampled caches (``loss.tail: sampled``) take ``forward_kl`` only."""
    beta: float = Field(default=0.5, gt=0, lt=1)
    """``β`` of ``divergence: jsd``, ``β KL(p‖m) + (1−β) KL(q‖m)`` with ``m = β p + (1−β) q``:
    near 0 it behaves like forward KL, near 1 like reverse KL (TRL's convention)."""
    skew: float = Field(default=0.1, ge=0, lt=1)
    """``λ`` of the skew KLs: ``KL(p ‖ λp + (1−λ)q)`` and ``KL(q ‖ λq + (1−λ)p)`` (DistiLLM's
    default 0.1; 0 gives plain forward / reverse KL)."""
    akl_mu: float = Field(default=0.5, gt=0, lt=1)
    """``μ`` of ``divergence: akl``: the teacher mass of the head (its most probable categories)."""

    @model_validator(mode="after")
    def _divergence_needs_a_distribution(self) -> "LossConfig":
        if self.tail == "sampled" and self.divergence != "forward_kl":
            raise ValueError(f"loss.divergence={self.divergence} needs loss.tail bucket or renormalize: the "
                             "sampled estimator (loss.tail=sampled) is unbiased for forward KL only")
        return self
    tail: Literal["renormalize", "bucket", "sampled"] = "bucket"
    """How the teacher targets enter the KL (formulas in pipeline/student/losses.py): ``renormalize``
    (the stored support renormalised), ``bucket`` (the tail mass as one extra outcome) or
    ``sampled`` (CE against the stored estimate, the unbiased estimator for sampled caches).
    Unset: ``bucket`` for ``topk`` caches, ``sampled`` for ``sampled`` / ``topk+sampled``
    caches (read from ``data.train_cache``'s manifest when train-student starts); incompatible
    pairs are refused then (:func:`pipeline.student.losses.resolve_tail`)."""
    cross_tokenizer: Literal["gold", "uld"] | None = None
    """Required, and only used, when the student's tokenizer (``data.tokenizer``, or the
    tokenizer files of ``student.path``) differs from the train cache's (a cache written with
    ``cache.text_offsets``): ``gold`` (KL over the
    teacher ids that have a student token with the same string, plus the ULD distance on the
    unmapped rest) or ``uld`` (the sorted-probability distance only). Formulas and sources in
    pipeline/student/cross_tokenizer_loss.py; ``tail`` and ``divergence`` do not apply."""
    aux_loss_coef: float = Field(default=0.0, ge=0)
    """Weight of the student's own auxiliary loss (e.g. a MoE router load-balancing loss,
    ``outputs.aux_loss`` with ``output_router_logits=True``); 0 = not requested."""
    router: RouterLossConfig = RouterLossConfig()
    """Router losses of a MoE student by name, each with its own coefficient (all 0: off); unlike
    ``aux_loss_coef`` they need no ``aux_loss`` from the model, only its ``router_logits``."""
    chunk_size: int = Field(default=0, ge=0)
    """Valid positions per log-softmax chunk, bounding the float32 (chunk, V) temporaries;
    0 = automatic (``pipeline.student.fused_driver.AUTO_CHUNK_BYTES``: 128 MiB of float32 (chunk, V) temporaries)."""


class ParamGroupConfig(_Section):
    """Parameters whose name matches ``pattern`` (``re.search``) get their own LR / decay."""

    pattern: str
    lr: float | None = Field(default=None, gt=0)
    weight_decay: float | None = Field(default=None, ge=0)


class OptimConfig(_Section):
    """AdamW with linear warmup and a cosine / linear / constant decay."""

    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = Field(default=20, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    param_groups: list[ParamGroupConfig] = Field(default_factory=list)
    """E.g. ``[{pattern: embed_tokens, lr: 1e-3}]``; the first matching group wins; norms and
    biases (ndim < 2) never get weight decay."""


class TrainCacheEntry(_Section):
    """One teacher cache of a mixture (``data.train_caches``) and its share of the draws."""

    path: str
    """Teacher cache directory or URL (stage 1 output)."""
    _file_path = field_validator("path")(_file_url_to_path)
    weight: float = Field(default=1.0, gt=0)
    """Relative share: cache c gets ``weight_c / Σ weight`` of the draws in expectation,
    whatever its size (GKD's λ when mixing human data and on-policy samples)."""


class TrainDataConfig(_Section):
    """What the student trains and evaluates on."""

    train_cache: str | None = None
    """Teacher cache directory (stage 1 output)."""
    train_caches: list[TrainCacheEntry] | None = None
    """Several teacher caches mixed with weights, e.g. ``[{path: runs/human-cache, weight: 0.5},
    {path: runs/round-1/cache, weight: 0.5}]``; exclusive with ``train_cache``. Each epoch
    draws as many samples as the caches hold, with replacement, a sample of cache c (N_c
    samples) with probability ``weight_c / (N_c · Σ weight)``. With two or more caches the sample IDs
    (loss logs, ``select``) are ``"{c}:{id}"`` with c the cache's position in the list; one
    entry trains exactly as ``train_cache`` with its path. All caches need the same teacher
    tokenizer, vocabulary, target type, k and temperature (checked at start)."""
    eval_cache: str | None = None
    """Held-out teacher cache directory; evaluation is skipped when unset. Its loss picks
    ``best/`` and early stopping, so it must score what training scores: the same teacher
    tokenizer, vocabulary, target type, k and temperature as the train cache, and the resolved
    ``loss.tail`` valid for it (checked at start; a difference is refused naming both caches)."""
    train_dataset: DatasetConfig | None = None
    """CE-only training straight from a dataset (no teacher; requires ``loss.alpha: 1``).
    Used to pretrain the demo teacher with the same training code."""
    eval_dataset: DatasetConfig | None = None
    tokenizer: str | None = None
    """The student's tokenizer directory; unset: the tokenizer files of the student's directory
    (``student.path``), else the cache's copy of the teacher tokenizer. Checked against the
    train cache's tokenizer fingerprint at start: another tokenizer is refused unless
    ``loss.cross_tokenizer`` is set. ``best/`` and ``final/`` carry this tokenizer."""
    _local_path = field_validator("tokenizer")(_local_only)
    eval_max_samples: int | None = Field(default=None, ge=1)
    """Evaluate on this many eval samples, drawn at random with the run's ``seed`` (the same
    subset at any rank count and after a resume; not the first N, which stage 1's length sort
    makes the longest); None: all of them."""
    num_workers: int = Field(default=1, ge=0)
    """Background threads that read and collate micro-batches ahead of the trainer (0: inline).
    One thread reads ≥ 20× faster than the demo student consumes; more threads compete with the
    trainer's compute threads for CPU cores (measured 5-8 % slower steps at 2 on 2 cores)."""
    prefetch_steps: int = Field(default=4, ge=1)
    """Optimizer steps of micro-batches prepared ahead."""
    max_cached_bytes: int = Field(default=2 << 30, ge=0)
    """Bound of each cache reader's LRU of decoded blocks (bytes)."""
    shuffle: Literal["streams", "global", "block"] = "streams"
    """``streams`` (default for a cache): shards and their blocks in a random order per epoch,
    cut into ``shuffle_streams`` streams read through a shuffle buffer of ``shuffle_window``
    blocks each; every rank decodes only its own streams' blocks, once per epoch, and the steps
    are the same at every world size dividing ``shuffle_streams`` (pipeline/student/streams.py).
    ``global``: a full permutation per epoch (what ``streams`` falls back to for a dataset and
    for weighted or mixed draws, which it cannot serve). ``block``: cache blocks in random order,
    samples shuffled within windows of ``shuffle_window`` blocks, every rank decoding every
    block (pipeline/student/sampler.py). docs/concepts/scale.md compares the three."""
    shuffle_window: int = Field(default=16, ge=1)
    """Blocks mixed together: per stream (``streams``) or per window (``block``)."""
    shuffle_streams: int | None = Field(default=None, ge=1)
    """Streams of the ``streams`` shuffle, a multiple of the world size; None: 8 rounded up to a
    multiple of it. Runs (and resumes) at world sizes with the same count read the same steps."""
    packing: bool = False
    """Pack each micro-batch's samples into rows of ``pack_length`` tokens (first-fit
    decreasing), attention confined to each sample by position ids that restart per sample.
    The micro-batch still holds ``micro_batch_size`` samples, so the loss, gradient and loss-log
    rows equal the unpacked run's; less compute goes to padding."""
    pack_length: int | None = Field(default=None, ge=2)
    """Tokens per packed row; None = the cache's ``max_length`` (or the longest sample)."""

    @model_validator(mode="after")
    def _one_source(self) -> "TrainDataConfig":
        if self.train_cache is not None and self.train_caches is not None:
            raise ValueError("data.train_caches and data.train_cache: give exactly one of them")
        if self.train_caches is not None and not self.train_caches:
            raise ValueError("data.train_caches is empty: give at least one {path, weight}")
        seen: dict[str, int] = {}
        for i, c in enumerate(self.train_caches or []):
            key = os.path.normpath(os.path.abspath(c.path))  # a URL too: "s3://b/x/" → "<cwd>/s3:/b/x"
            if key in seen:  # its samples would be drawn twice as often as its weight says
                raise ValueError(f"data.train_caches: cache {c.path} is listed twice (entries {seen[key]} and {i}); "
                                 "list it once and give it the summed weight")
            seen[key] = i
        if (not self.cache_paths()) == (self.train_dataset is None):
            raise ValueError("set exactly one of data.train_cache (or data.train_caches) and data.train_dataset")
        if self.train_dataset is not None and self.tokenizer is None:
            raise ValueError("data.tokenizer is required with data.train_dataset")
        return self

    def cache_paths(self) -> list[str]:
        """The train caches' paths in order: ``[train_cache]``, the ``train_caches`` paths, or
        ``[]`` (training from ``train_dataset``)."""
        if self.train_caches is not None:
            return [c.path for c in self.train_caches]
        return [self.train_cache] if self.train_cache is not None else []

    @property
    def first_cache(self) -> str | None:
        """The first train cache (its manifest and tokenizer speak for all); None without a cache."""
        paths = self.cache_paths()
        return paths[0] if paths else None


class EarlyStoppingConfig(_Section):
    """Stop when ``eval/loss`` has not improved by more than ``min_delta`` for ``patience`` evals."""

    patience: int | None = Field(default=None, ge=1)
    """Evaluations without improvement before stopping; None disables early stopping."""
    min_delta: float = Field(default=0.0, ge=0)


class LRFindConfig(_Section):
    """LR range test (``train-student --lr-find``): exponential LR ramp, loss recorded."""

    enabled: bool = False
    min_lr: float = Field(default=1e-6, gt=0)
    max_lr: float = Field(default=1.0, gt=0)
    steps: int = Field(default=100, ge=2)


class SelectConfig(_Section):
    """Which samples a round trains on, from the previous round's train loss log
    (per-sample ``{metric}`` per token over all its visits). Set exactly one criterion."""

    metric: Literal["loss", "ce", "kl", "distill"] = "kl"
    """The per-token column: ``kl`` (forward KL), ``distill`` (the configured
    ``loss.divergence``), ``ce`` or ``loss``."""
    top_fraction: float | None = Field(default=None, gt=0, le=1)
    """The hardest fraction of the samples (highest metric per token)."""
    threshold: float | None = None
    """Samples whose metric per token is at least this (nats)."""
    quantile: tuple[float, float] | None = None
    """Samples whose metric per token lies between these quantiles, e.g. [0.5, 0.9]."""
    random_fraction: float | None = Field(default=None, gt=0, le=1)
    """A uniformly random fraction of the previous round's samples, drawn with the run's
    ``seed`` and the round (the baseline for ``top_fraction``: same size, no loss)."""

    @model_validator(mode="after")
    def _one_criterion(self) -> "SelectConfig":
        crit = (self.top_fraction, self.threshold, self.quantile, self.random_fraction)
        if sum(x is not None for x in crit) != 1:
            raise ValueError("select needs exactly one of top_fraction, threshold, quantile, random_fraction")
        return self


class WandbConfig(_Section):
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "kd-pipeline"
    name: str | None = None


class CallbackConfig(_Section):
    """One callback (pipeline/student/callbacks.py): ``{target: my_pkg.hooks:DumpSamples, every: 100}``;
    the keys other than ``target`` are passed to it as keyword arguments."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    target: str
    """``package.module:Name`` of a class (or factory) with some of the callback methods."""


class TrainStudentConfig(_Section):
    """``train-student``: train a student from the teacher cache."""

    storage_options: StorageOptions = Field(default_factory=dict)
    """Options of the file systems of URLs in this config (see :data:`StorageOptions`)."""
    _storage = field_validator("storage_options")(_apply_storage_options)
    output_dir: str
    """Run directory (checkpoints, exports, loss logs, metrics): a local path or a URL
    (``s3://bucket/runs/x``; see pipeline/student/checkpoint.py for what marks completion there)."""
    _file_paths = field_validator("output_dir", "resume")(_file_url_to_path)
    student: StudentConfig
    data: TrainDataConfig
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    wandb: WandbConfig = WandbConfig()
    micro_batch_size: int = Field(default=8, ge=1)
    """Sequences per forward/backward, per rank."""
    grad_accum_steps: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step, per rank."""
    max_steps: int = Field(default=100, ge=1)
    """Optimizer steps (ignored when ``epochs`` is set)."""
    epochs: int | None = Field(default=None, ge=1)
    """Train for this many epochs: ``max_steps = epochs × steps per epoch``."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass (less memory)."""
    eval_steps: int = Field(default=50, ge=1)
    log_steps: int = Field(default=10, ge=1)
    seed: int = 0
    round: int = Field(default=0, ge=0)
    """Round index written to the loss logs and metrics."""
    save_steps: int | None = Field(default=None, ge=1)
    """Write a sharded checkpoint every N optimizer steps (and on SIGTERM/SIGINT); None: never."""
    save_total_limit: int = Field(default=2, ge=1)
    """Complete checkpoints kept; the oldest is deleted only after a newer one is complete."""
    resume: str = "auto"
    """``auto`` (newest complete checkpoint in output_dir/checkpoints, if any), ``never``, or the
    path or URL of a checkpoint."""
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    callbacks: list[CallbackConfig] = Field(default_factory=list)
    """Callbacks by import path, called on every rank at each event (pipeline/student/callbacks.py), e.g.
    ``[{target: my_pkg.hooks:DumpSamples, every: 100}]``; metrics logging and early stopping
    are built-in callbacks that run first."""
    lr_find: LRFindConfig = LRFindConfig()
    select: SelectConfig | None = None
    """Train only on samples selected from the previous round's loss log (None: all samples)."""
    weight_by: Literal["loss", "ce", "kl", "distill"] | None = None
    """Round r > 0: draw each epoch's samples with replacement, with probability proportional
    to their ``{weight_by}`` per token in round r-1's train log (after ``select``); None: uniform
    permutation."""
    carry_optimizer: bool = False
    """In round r > 0, start from round r-1's final AdamW state (moments) instead of a fresh
    optimizer; learning rates and the schedule still come from this round's config."""
    rounds: list[dict] = Field(default_factory=list)
    """Multi-round run: one dict of overrides of this config per round (e.g. ``{max_steps: 200,
    select: {metric: kl, top_fraction: 0.3}}``); round r starts from round r-1's final student
    with a fresh optimizer. Empty: a single round."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """Compute precision of the student (FSDP2 ``MixedPrecisionPolicy``; the sharded parameters,
    gradients, optimizer state and checkpoints stay float32). ``auto``: ``bf16`` on CUDA, ``no``
    on CPU. ``no``: float32 everywhere. ``bf16`` / ``fp16``: parameters and activations in that
    dtype, gradients reduced in float32, on any device (on CPUs without bf16/fp16 arithmetic it
    is slow: for testing). ``fp16`` adds dynamic loss scaling (``torch.amp.GradScaler``): a step
    whose gradients overflow is skipped, the scale halved, and the step counted as
    ``train/overflow_steps`` (not against ``skip_nonfinite``)."""
    fsdp_at_world_size_1: bool = False
    """At world size 1 with float32 compute (``mixed_precision: no``, or ``auto`` on CPU) the
    student is trained as the plain module, without FSDP2's ``fully_shard`` (no all-gather,
    reduce-scatter or DTensor dispatch per step); checkpoints, exports, losses and gradients are
    the same, and checkpoints resume at any world size. ``true`` wraps it in FSDP2 anyway.
    Mixed precision (bf16/fp16) is FSDP2's ``MixedPrecisionPolicy``, so it is always wrapped."""
    save_precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Dtype of the floating-point weights in the ``best/`` and ``final/`` exports (config.json's
    ``dtype`` says the same); checkpoints always keep float32."""
    skip_nonfinite: int = Field(default=0, ge=0)
    """Optimizer steps with a NaN/inf loss or gradient norm that may be skipped (weights and
    AdamW state untouched, counted and logged as ``train/skipped_steps``) before the run stops;
    0: the first one stops the run with an error naming the step and the samples."""
    max_consecutive_overflows: int = Field(default=20, ge=1)
    """``mixed_precision: fp16``: the run stops with an error after this many optimizer steps in a
    row were skipped for a gradient overflow. Each overflow halves the loss scale, so 20 in a row
    take it from 2^16 to 2^-4: gradients that overflow at every scale come from the model or the
    data, not from a scale still settling, and the run would otherwise end with no update at all.
    Ignored without loss scaling."""

    @model_validator(mode="after")
    def _ce_only_without_teacher(self) -> "TrainStudentConfig":
        if self.data.train_dataset is not None and self.loss.alpha != 1.0:
            raise ValueError("loss.alpha must be 1 when training from data.train_dataset (no teacher)")
        return self


