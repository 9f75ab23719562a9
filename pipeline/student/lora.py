"""LoRA students: adapters (Hu et al. 2021, arXiv:2106.09685) on a frozen pretrained student.

peft's ``inject_adapter_in_model`` replaces each target ``nn.Linear`` in place by a peft
``lora.Linear`` (the original layer becomes its ``base_layer``): no wrapper class, so the
transformer blocks (FSDP2 units), the output layer (the fused loss) and every other path of
stage two see the model they know. The run's life of an adapter:

1. :func:`add_adapters` (before ``fully_shard``, the base still on the meta device): inject,
   freeze every base parameter, initialise A and B on CPU from the run seed (full tensors, the
   same on every rank and at every world size), move them back to the base's device.
2. :func:`load_initial_adapters` (after the base's rows are read): copy each rank's rows of
   those initial values into its shards.
3. Checkpoints hold the trainable parameters only (pipeline/student/checkpoint.py ``_dcp_state``):
   the frozen base is re-read from ``student.path`` on resume.
4. :func:`split_export` + :func:`save_adapter` (``best/``, ``final/``): the directory itself is a
   full Hugging Face model with the adapters merged (``W + scaling · B A``), so every consumer
   of an export (the next round, evaluation, ``from_pretrained``) works unchanged; ``adapter/``
   inside it is the peft adapter (``adapter_config.json`` + ``adapter_model.safetensors``),
   loadable with ``PeftModel.from_pretrained(base, dir / "adapter")``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from pipeline.config import StudentConfig
from pipeline.storage.errors import one_line

ADAPTER = "default"
"""peft's adapter name: state-dict keys ``...q_proj.lora_A.default.weight``."""
ADAPTER_DIR = "adapter"
"""Sub-directory of an export holding the peft adapter."""
_PEFT_PREFIX = "base_model.model."
"""Key prefix of a saved peft adapter (``PeftModel`` wraps the model as ``base_model.model``)."""


def _config_key(student: StudentConfig) -> str:
    return "student.lora" if student.lora is not None else "student.peft_config"


def peft_lora_config(student: StudentConfig):
    """The ``peft.LoraConfig`` of ``student.lora`` or ``student.peft_config``, and the
    ``modules_to_save`` entries (kept out of the injected config: they are trained in place,
    not wrapped by peft's ``ModulesToSaveWrapper``).

    Returns:
        (``peft.LoraConfig`` with ``modules_to_save=None``, list of module-name suffixes).
    Raises:
        FileNotFoundError: ``student.peft_config`` names no file (nor a directory with
            ``adapter_config.json``).
        ValueError: not a LoRA config, invalid JSON, or a LoRA feature this trainer does not
            implement (DoRA, ``lora_bias``, data-dependent initialisation, ``fan_in_fan_out``);
            the key and the file are named.
    """
    from peft import LoraConfig

    if student.lora is not None:
        c = student.lora
        cfg = LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=c.target_modules,
                         use_rslora=c.rslora, init_lora_weights=True if c.init == "default" else "gaussian",
                         task_type="CAUSAL_LM", base_model_name_or_path=str(student.path))
        return cfg, list(c.modules_to_save)
    p = Path(student.peft_config)
    f = p / "adapter_config.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"student.peft_config: no adapter config at {f}")
    try:
        raw = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"student.peft_config {f}: invalid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("peft_type", "LORA") != "LORA":
        got = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"student.peft_config {f}: peft_type {got!r}; only LORA adapters are trained here")
    unsupported = {"use_dora": raw.get("use_dora"), "lora_bias": raw.get("lora_bias"),
                   "fan_in_fan_out": raw.get("fan_in_fan_out"), "layer_replication": raw.get("layer_replication")}
    if raw.get("init_lora_weights", True) not in (True, "gaussian"):
        unsupported["init_lora_weights"] = raw["init_lora_weights"]
    bad = {k: v for k, v in unsupported.items() if v}
    if bad:
        raise ValueError(f"student.peft_config {f}: {bad} not supported (adapters are initialised before the "
                         "base weights are read; merge is W + scaling * B A)")
    save = list(raw.get("modules_to_save") or [])
    known = set(LoraConfig.__dataclass_fields__)
    kwargs = {k: v for k, v in raw.items() if k in known and k not in ("modules_to_save", "base_model_name_or_path")}
    cfg = LoraConfig(**{**kwargs, "task_type": "CAUSAL_LM", "base_model_name_or_path": str(student.path)})
    return cfg, save


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None)


def add_adapters(model: nn.Module, student: StudentConfig, seed: int) -> dict[str, torch.Tensor]:
    """Inject LoRA adapters into ``model`` in place, freeze the base, initialise the adapters.

    Call after ``defer_output_projection`` and before ``fully_shard``. The base may be on the
    meta device (``load_student_sharded``); the adapters are initialised on CPU with peft's own
    ``reset_lora_parameters`` (A kaiming-uniform or gaussian, B zero: the model starts equal
    to the base) under ``torch.manual_seed(seed)`` in a forked RNG (the training RNG stream is
    untouched), in module order, so every rank and every world size draws the same values.

    Trainable afterwards: every ``lora_A`` / ``lora_B`` weight and the parameters of modules
    whose name ends with a ``modules_to_save`` entry (peft's rule); everything else is frozen.

    Returns:
        The initial adapter values, full CPU float32 tensors by parameter name (``(r, in)``
        for A, ``(out, r)`` for B), for :func:`load_initial_adapters`.
    Raises:
        ValueError: a target that names the output layer, targets matching no layer or a
            non-linear one, a ``modules_to_save`` entry matching no module (key named).
    """
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    from pipeline.distributed import print0

    key = _config_key(student)
    cfg, save = peft_lora_config(student)
    head = _module_name(model, model.get_output_embeddings())
    targets = [cfg.target_modules] if isinstance(cfg.target_modules, str) else list(cfg.target_modules or [])
    hit = [t for t in targets if t != "all-linear" and head and (head == t or head.endswith("." + t))]
    if hit:
        raise ValueError(f"{key}.target_modules {hit}: the output layer ({head}) is never a LoRA target "
                         "(it runs inside the fused loss)")
    try:
        inject_adapter_in_model(cfg, model, ADAPTER, low_cpu_mem_usage=True)
    except ValueError as e:
        first = one_line(e, first=True)
        raise ValueError(f"{key}.target_modules {cfg.target_modules}: {first}") from None
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    for n, m in layers.items():
        if not isinstance(m.get_base_layer(), nn.Linear):
            raise ValueError(f"{key}.target_modules: {n} is a {type(m.get_base_layer()).__name__}; only linear "
                             "layers are adapted")
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        if ".lora_A." in n or ".lora_B." in n:
            p.requires_grad_(True)
    for entry in save:
        found = [m for n, m in model.named_modules() if n.endswith(entry) and n]
        if not found:
            raise ValueError(f"{key}.modules_to_save: {entry!r} matches no module")
        for m in found:
            m.requires_grad_(True)
    values: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for n, m in layers.items():
            device = m.get_base_layer().weight.device
            for attr in ("lora_A", "lora_B"):
                getattr(m, attr)[ADAPTER].to_empty(device="cpu")
            m.reset_lora_parameters(ADAPTER, cfg.init_lora_weights)
            for attr in ("lora_A", "lora_B"):
                lin = getattr(m, attr)[ADAPTER]
                values[f"{n}.{attr}.{ADAPTER}.weight"] = lin.weight.detach().clone()
                lin.to(device)  # back to the meta device when the base is there: fully_shard sees one kind
    model.kd_lora = (cfg, save)  # for the exports (adapter_config.json)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"[lora] {len(layers)} layers adapted (r={cfg.r}, alpha={cfg.lora_alpha}"
           f"{', rslora' if cfg.use_rslora else ''}{f', modules_to_save={save}' if save else ''}); "
           f"{n_train / 1e6:.3f}M trainable parameters")
    return values


def load_initial_adapters(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy this rank's rows of the full initial adapter values (:func:`add_adapters`) into the
    (possibly FSDP2-sharded, ``Shard(0)``) parameters of ``model``; local, no collective.

    Raises:
        KeyError: a name of ``values`` that is no parameter of ``model``.
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, full in values.items():
            p = params[name]
            if isinstance(p, DTensor):
                shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
                local = p.to_local()
                if local.numel():
                    local.copy_(full[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
            else:
                p.copy_(full)


def is_lora(model: nn.Module) -> bool:
    """Whether :func:`add_adapters` adapted ``model``."""
    return hasattr(model, "kd_lora")


def split_export(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """From the full state dict of a LoRA student to (merged HF state dict, peft adapter state).

    Merged: each adapted layer's ``X.base_layer.weight`` W (out, in) becomes ``X.weight`` =
    ``W + scaling · (B @ A)`` with B (out, r), A (r, in) and ``scaling = alpha / r`` (or
    ``alpha / sqrt(r)``), peft's ``lora.Linear.get_delta_weight``; ``X.base_layer.bias`` becomes
    ``X.bias``; adapter tensors are dropped. Adapter: ``base_model.model.X.lora_A.weight`` ...
    (peft's saved key format, the adapter name removed) plus the ``modules_to_save``
    parameters under ``base_model.model.<name>``.

    Args:
        state: the gathered full state dict (CPU tensors; rank 0 of ``full_state_dict``).
    """
    from peft.tuners.lora import LoraLayer

    _, save = model.kd_lora
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    saved_mods = [n for n, _ in model.named_modules() if n and any(n.endswith(e) for e in save)]
    merged, adapter = {}, {}
    for k, v in state.items():
        mod, _, leaf = k.rpartition(".")
        if ".lora_A." in k or ".lora_B." in k:
            adapter[_PEFT_PREFIX + k.replace(f".{ADAPTER}.", ".")] = v
            continue
        if mod.endswith(".base_layer") and mod[: -len(".base_layer")] in layers:
            name = mod[: -len(".base_layer")]
            if leaf == "weight":
                A, B = state[f"{name}.lora_A.{ADAPTER}.weight"], state[f"{name}.lora_B.{ADAPTER}.weight"]
                v = v + (B @ A) * layers[name].scaling[ADAPTER]  # (out, r) @ (r, in)
            merged[f"{name}.{leaf}"] = v
            continue
        merged[k] = v
        if any(mod == m or mod.startswith(m + ".") for m in saved_mods):
            adapter[_PEFT_PREFIX + k] = v
    return merged, adapter


def save_adapter(model: nn.Module, adapter: dict[str, torch.Tensor], out_dir: str | Path) -> None:
    """Write the peft adapter directory: ``adapter_config.json`` (the run's LoRA config,
    ``base_model_name_or_path`` = ``student.path``) and ``adapter_model.safetensors``."""
    from safetensors.torch import save_file

    cfg, save = model.kd_lora
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.modules_to_save = save or None
    try:
        cfg.save_pretrained(str(out))
    finally:
        cfg.modules_to_save = None
    save_file({k: v.contiguous() for k, v in adapter.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
