"""Sharded loading: build a model on the meta device and read only this rank's rows of each
safetensors tensor, so no rank ever holds the whole model (teacher and student)."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.models.checkpoint_names import Source, map_checkpoint
from pipeline.models.common import auto_config, check_config, from_pretrained, require_dir, set_role
from pipeline.models.safetensors_io import CheckpointFiles


@contextlib.contextmanager
def _parameters_on_meta():
    """Inside the block every parameter a module registers is replaced at once by a meta
    tensor of its shape and dtype, while buffers (rotary ``inv_freq``...) stay real CPU
    tensors computed by the constructor. Only one layer's uninitialised storage exists at a
    time (the idea of accelerate's ``init_empty_weights(include_buffers=False)``)."""
    orig = nn.Module.register_parameter

    def register(self, name, param):
        orig(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def _whole_load(p: Path, what: str, dtype: torch.dtype, device: torch.device,
                shard: Callable[[nn.Module], object], frozen: bool) -> nn.Module:
    """The model of a directory without safetensors weights, loaded whole on every rank by
    ``from_pretrained`` (which raises when there are no weights at all), then sharded; one
    line says why when ``pytorch_model*.bin`` files are found."""
    if any(p.glob("*.bin")):
        print(f"[{what}] {p}: whole-model load on every rank: its weights are .bin files, not safetensors "
              "(save them with save_pretrained(safe_serialization=True) to read only each rank's rows)", flush=True)
    model = set_role(from_pretrained(p, what, dtype), frozen)
    shard(model)
    return model.to(device)


def _rows(files: CheckpointFiles, src: Source, start: int, rows: int) -> torch.Tensor:
    """Rows ``[start, start + rows)`` (dim 0) of the parameter that ``src`` describes: read as
    they are from a renamed tensor; from stacked experts, experts ``start .. start + rows - 1``
    of every part, stacked, then the parts concatenated (the other experts are never read)."""
    if not src.experts:
        return files.read_rows(src.parts[0][0], start, rows)
    return torch.cat([torch.stack([files.read_rows(name, 0) for name in part[start: start + rows]])
                      for part in src.parts], dim=src.concat_dim)


class _Owners:
    """The modules owning a model's parameters and buffers, recorded before ``shard(model)``,
    to find the tensors that hold them after it (:meth:`tensors`).

    ``shard`` may wrap modules (LoRA: ``q_proj`` becomes ``q_proj.base_layer``, the same module
    object under a new name) or replace them (the output layer becomes an
    :class:`~pipeline.models.OutputProjection`, a new object under the old name; the detached
    old layer must not be filled). A recorded module still in the model is followed; one no
    longer in it is looked up by its dotted name.
    """

    def __init__(self, model: nn.Module, names: list[str]):
        self.model = model
        self.owners = {}
        for name in names:
            path, _, attr = name.rpartition(".")
            self.owners[name] = (path, model.get_submodule(path), attr)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Name → the parameter or buffer the model uses now (call after sharding and
        ``to_empty``, which both replace parameter objects)."""
        live = {id(m) for m in self.model.modules()}
        out = {}
        for name, (path, module, attr) in self.owners.items():
            if id(module) not in live:
                module = self.model.get_submodule(path)
            out[name] = getattr(module, attr)
        return out


def _load_sharded(p: Path, what: str, dtype: torch.dtype, device: torch.device,
                  shard: Callable[[nn.Module], object], frozen: bool) -> nn.Module:
    """The model in directory ``p`` (the ``what``: student/teacher), never whole on this rank:
    see :func:`load_teacher_sharded`. ``frozen``: as :func:`set_role`. Every weight file's
    header and every tensor's name and shape are checked before ``shard`` is called."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from transformers import AutoModelForCausalLM

    config = auto_config(p, what)
    try:
        files = CheckpointFiles(p, what)
    except FileNotFoundError:
        return _whole_load(p, what, dtype, device, shard, frozen)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sources = map_checkpoint(model, files.files, what, p)
    state = model.state_dict(keep_vars=True)
    for name, src in sources.items():
        try:
            shape = src.full_shape(files.shape)
        except ValueError as e:
            raise ValueError(f"{what} {p}: {e}") from None
        if shape != tuple(state[name].shape):
            raise ValueError(f"{what} {files.files[src.parts[0][0]]}: tensor {src.parts[0][0]} gives {name} the shape "
                             f"{shape}, the model built from config.json expects {tuple(state[name].shape)}")
    if (p / "generation_config.json").is_file():  # as from_pretrained does (exported with the model)
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(p))
    set_role(model, frozen)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    owners = _Owners(model, [*sources, *buffers])
    shard(model)
    model.to_empty(device=device)
    tensors = owners.tensors()
    with torch.no_grad(), files:
        for name, b in buffers.items():  # to_empty left them uninitialised
            tensors[name].copy_(b)
        for name, src in sources.items():
            param = tensors[name]
            if tuple(param.shape) != tuple(state[name].shape):
                raise RuntimeError(f"{what} {p}: {name} is {tuple(param.shape)} after sharding, {tuple(state[name].shape)} before")
            local, start = param, 0
            if isinstance(param, DTensor):
                local = param.to_local()
                _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
                start = offset[0] if local.dim() else 0
            if local.numel():
                local.copy_(_rows(files, src, start, local.shape[0]) if local.dim() else files.read_rows(src.parts[0][0], 0))
    return model


def load_teacher_sharded(path: str | os.PathLike, dtype: torch.dtype, device: torch.device,
                         shard: Callable[[nn.Module], object]) -> nn.Module:
    """A frozen teacher that never exists whole on this rank: built with its parameters on the
    meta device, sharded by ``shard`` (``pipeline.distributed.shard_model``: FSDP2, dim-0
    shards), materialised on ``device``, and filled with only this rank's rows of every
    parameter, read from the safetensors files with plain reads of those rows' bytes (the
    other ranks' rows are never read; nothing is memory-mapped). Peak host memory per rank ≈ the rank's shard (1/world size of the
    parameter bytes) plus one layer's buffers, instead of the whole teacher (torchtitan's
    meta-device initialisation; FSDP2's ``Shard(0)`` layout via
    ``compute_local_shape_and_global_offset``).

    Checkpoint tensor names are mapped to the model's as the installed transformers maps them
    (renames; per-expert tensors stacked into fused expert parameters, each rank reading only
    its experts: :mod:`pipeline.models.checkpoint_names`). Every parameter is filled in the
    module the sharded model uses (the output layer that ``shard`` replaced included). A
    checkpoint without safetensors files (``*.bin``) is loaded whole on every rank, then
    sharded, with one line saying so.

    Args:
        dtype: parameter dtype (float32 on CPU, bfloat16 on GPUs); checkpoint tensors are cast.
        shard: called once with the model (parameters on the meta device, buffers real) before
            any weight is read; it shards the model in place.
    Returns:
        The sharded model (parameters DTensors of the checkpoint's global shapes, ``dtype``),
        eval mode, ``requires_grad=False`` everywhere.
    Raises:
        FileNotFoundError, ValueError: as :func:`load_teacher` (path named); a tensor whose
            shape differs from the model's, a checkpoint tensor that maps to no parameter, a
            conversion other than renames and stacked experts, a parameter with no tensor (each
            named with the model class); all before ``shard`` is called.
    """
    p = require_dir(path, "teacher directory")
    check_config(p, "teacher")
    return _load_sharded(p, "teacher", dtype, device, shard, frozen=True)


def load_student_sharded(path: str | os.PathLike, dtype: torch.dtype, device: torch.device,
                         shard: Callable[[nn.Module], object]) -> nn.Module:
    """A pretrained student (``student.init: pretrained``) that never exists whole on this
    rank, loaded as :func:`load_teacher_sharded` loads a teacher; its parameters are equal
    bit for bit to those of :func:`build_student` with ``init='pretrained'``.

    Args:
        path: the student's HF directory, or its ``config.json`` file.
        dtype: parameter dtype (float32; ``shard`` may add a bf16 mixed-precision policy);
            checkpoint tensors are cast.
        shard: called once with the model (parameters on the meta device, buffers real) before
            any weight is read (pipeline/student/loop.py defers the output layer, checks the
            vocabulary, enables gradient checkpointing and calls ``shard_model`` in it).
    Returns:
        The sharded student: train mode, every parameter trainable (DTensors of global shape),
        ``config.use_cache = False``.
    Raises:
        FileNotFoundError, ValueError: as :func:`build_student` with ``init='pretrained'`` (the
            missing or corrupt file named), all before ``shard`` is called; whatever ``shard``
            raises.
    """
    p = require_dir(path, "student path")
    check_config(p, "student")
    return _load_sharded(p.parent if p.is_file() else p, "student", dtype, device, shard, frozen=False)


