"""Sharded loading: build a model on the meta device and read only this rank's rows of each
safetensors tensor, so no rank ever holds the whole model (teacher and student)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from pipeline.models.common import auto_config, check_config, from_pretrained, require_dir, set_role, unreadable_weights
from pipeline.storage.errors import describe


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


def _safetensors_index(p: Path, what: str) -> dict[str, Path]:
    """Tensor name → the ``.safetensors`` file holding it (``model.safetensors`` or the files
    of ``model.safetensors.index.json``) of the ``what`` (student/teacher) in ``p``.

    Raises:
        FileNotFoundError: no safetensors weights in ``p``.
        ValueError: the weight file or the index is truncated or corrupt (named).
    """
    index = p / "model.safetensors.index.json"
    single = p / "model.safetensors"
    try:
        if index.is_file():
            return {name: p / f for name, f in json.loads(index.read_text())["weight_map"].items()}
        if not single.is_file():
            raise FileNotFoundError(f"no safetensors weights in {p}")
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {name: single for name in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # SafetensorError (truncated header), JSONDecodeError, KeyError
        raise unreadable_weights(what, index if index.is_file() else single,
                                  describe(e)) from e


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def _safetensors_header(fh, file: Path, what: str) -> tuple[dict, int]:
    """The JSON header of an open ``.safetensors`` file and the byte offset where its data
    starts (format: little-endian u64 header length, the header, then the tensors' bytes,
    each at ``data_offsets`` relative to the data start; huggingface/safetensors README).

    Raises:
        ValueError: the header is truncated or not JSON, or the file ends before the last
            tensor's bytes (truncated); the ``what`` (student/teacher) and the file are named.
    """
    raw = fh.read(8)
    n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
    size = os.fstat(fh.fileno()).st_size
    if not 0 < n <= size - 8:
        raise unreadable_weights(what, file, f"header length {n}, file {size} bytes")
    try:
        header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        end = max((int(m["data_offsets"][1]) for m in header.values()), default=0)
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError, KeyError, IndexError) as e:
        raise unreadable_weights(what, file, f"header: {type(e).__name__}: {e}") from None
    if 8 + n + end > size:
        raise unreadable_weights(what, file, f"tensor data ends at byte {8 + n + end}, file {size} bytes")
    return header, 8 + n


def _read_rows(fh, file: Path, what: str, name: str, meta: dict, data_start: int, start: int,
               shape: torch.Size) -> torch.Tensor:
    """Rows ``[start, start + shape[0])`` of tensor ``name`` (its header entry ``meta``), read
    with one seek and one read: only those bytes are read, nothing is memory-mapped (mapped
    pages would count against the rank's memory). Returns a tensor of ``shape`` in the file's
    dtype.

    Raises:
        ValueError: an unknown dtype, or the file ends before the rows (truncated; named).
    """
    dtype = _SAFETENSORS_DTYPES.get(meta["dtype"])
    if dtype is None:
        raise ValueError(f"{what} {file}: tensor {name} has dtype {meta['dtype']}, not supported")
    full = list(meta["shape"])
    row_bytes = dtype.itemsize * (int(torch.Size(full[1:]).numel()) if len(full) > 1 else 1)
    begin, end = meta["data_offsets"]
    lo = begin + start * row_bytes if full else begin
    n_bytes = int(shape.numel()) * dtype.itemsize
    if lo + n_bytes > end:
        raise ValueError(f"{what} {file}: tensor {name}: rows beyond its data (a shard layout this loader does not know)")
    fh.seek(data_start + lo)
    buf = bytearray(n_bytes)
    if fh.readinto(buf) != n_bytes:
        raise unreadable_weights(what, file, f"tensor {name} cut short")
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the parameter or buffer ``name`` (a dotted state-dict name) and its
    attribute name there."""
    mod, _, attr = name.rpartition(".")
    return model.get_submodule(mod), attr


def _load_sharded(p: Path, what: str, dtype: torch.dtype, device: torch.device,
                  shard: Callable[[nn.Module], object], frozen: bool) -> nn.Module:
    """The model in directory ``p`` (the ``what``: student/teacher), never whole on this rank:
    see :func:`load_teacher_sharded`. ``frozen``: as :func:`set_role`. Every weight file's
    header, size and tensor shapes are checked before ``shard`` is called."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from transformers import AutoModelForCausalLM

    try:
        names = _safetensors_index(p, what)
    except FileNotFoundError:
        names = {}
    config = auto_config(p, what)
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = dict(model.named_parameters())
    if not names or set(params) - set(names):
        missing = sorted(set(params) - set(names))[:3]
        print(f"[{what}] {p}: whole-model load (tensor names {missing} not in its safetensors files)", flush=True)
        model = set_role(from_pretrained(p, what, dtype), frozen)
        shard(model)
        return model.to(device)
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(names[name], []).append(name)
    headers = {}
    for file in by_file:
        with open(file, "rb") as fh:
            headers[file] = _safetensors_header(fh, file, what)
    for name, param in params.items():
        meta = headers[names[name]][0].get(name)
        if meta is None:
            raise unreadable_weights(what, names[name], f"tensor {name} of the index is not in the file")
        if tuple(meta["shape"]) != tuple(param.shape):
            raise ValueError(f"{what} {names[name]}: tensor {name} has shape {tuple(meta['shape'])}, "
                             f"the model built from config.json expects {tuple(param.shape)}")
    if (p / "generation_config.json").is_file():  # as from_pretrained does (exported with the model)
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(p))
    set_role(model, frozen)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    # each tensor by its (module, attribute): ``shard`` may wrap modules and so rename them
    # (LoRA: q_proj.weight becomes q_proj.base_layer.weight), the module objects stay
    owners = {name: _owner(model, name) for name in [*params, *buffers]}
    shard(model)
    model.to_empty(device=device)
    for name, b in buffers.items():  # to_empty left them uninitialised
        getattr(*owners[name]).copy_(b)
    params = {name: getattr(*owners[name]) for name in params}
    for file, group in by_file.items():
        header, data_start = headers[file]
        with open(file, "rb") as fh:
            for name in group:
                param = params[name]
                local = param.to_local() if isinstance(param, DTensor) else param
                start = 0
                if isinstance(param, DTensor):
                    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
                    start = offset[0] if local.dim() else 0
                if local.numel():
                    with torch.no_grad():
                        local.copy_(_read_rows(fh, file, what, name, header[name], data_start, start, local.shape))
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

    Falls back to :func:`load_teacher` then ``shard`` (whole load) when the checkpoint is not
    safetensors or its tensor names differ from the model's (a checkpoint transformers
    converts on load), printing one line saying so.

    Args:
        dtype: parameter dtype (float32 on CPU, bfloat16 on GPUs); checkpoint tensors are cast.
        shard: called once with the model (parameters on the meta device, buffers real) before
            any weight is read; it shards the model in place.
    Returns:
        The sharded model (parameters DTensors of the checkpoint's global shapes, ``dtype``),
        eval mode, ``requires_grad=False`` everywhere.
    Raises:
        FileNotFoundError, ValueError: as :func:`load_teacher` (path named), and a tensor whose
            shape differs from the model's (named); all before ``shard`` is called.
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


