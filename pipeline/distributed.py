"""Process groups, FSDP2 wrapping, rank-0 helpers and collectives.

This is the only module that reads the torchrun environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``...). Everything else receives ``rank``/``world_size``.
A plain ``python`` run gets a one-rank gloo group (an in-process store), so the training
and precompute code has one path for its collectives (train-student trains the plain module at
one float32 rank: ``pipeline.student.loop.uses_fsdp``).
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` in ``[0, world_size)`` and its torch device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_torchrun_worker() -> bool:
    """True in a process started by torchrun (its agent sets ``TORCHELASTIC_RUN_ID``)."""
    return os.environ.get("TORCHELASTIC_RUN_ID") is not None


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the default process group from the torchrun environment.

    Backend: NCCL when CUDA is used, gloo on CPU. Without torchrun variables a one-rank
    group over an in-process ``HashStore`` is created. On CUDA, float32 matmuls may use
    TF32 from here on (:func:`allow_tf32`); on CPU nothing global changes.

    Args:
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    Raises:
        RuntimeError: ``device='cuda'`` without a CUDA device.
    """
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested but torch.cuda.is_available() is False")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        allow_tf32(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, device_id=dev if use_cuda else None)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def allow_tf32(device: torch.device) -> bool:
    """Let float32 matmuls on ``device`` use TF32 tensor cores (Ampere, compute capability 8.0,
    or newer); the one place the project sets it. Called by :func:`init_distributed`.

    Why: under bf16 mixed precision the fused output loss still forms its weight gradient in
    float32, and ``mixed_precision: no`` runs every matmul in float32; TF32 runs them on tensor
    cores (an H100 SXM: 495 dense TF32 TFLOP/s against 67 IEEE float32) with a 10-bit mantissa,
    float32 range and float32 accumulation: the trade Hugging Face's ``tf32`` training option
    offers. cuDNN convolutions already default to TF32.

    Uses ``torch.backends.cuda.matmul.fp32_precision = "tf32"`` where torch has it (2.9+; there
    mixing in the legacy ``allow_tf32`` flag makes torch raise when either is read), else the
    legacy ``torch.backends.cuda.matmul.allow_tf32 = True``. For IEEE float32 matmuls in a
    section (references, exactness checks) set ``fp32_precision = "ieee"`` around it.

    Args:
        device: the process's torch device.
    Returns:
        True when TF32 was allowed; False on a CPU device or a GPU older than Ampere, where
        nothing is changed.
    """
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
        return False
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    else:  # torch < 2.9
        torch.backends.cuda.matmul.allow_tf32 = True
    return True


def teardown() -> None:
    """Destroy the default process group if one exists (safe to call twice)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def finish(code: int = 0, *, sync: bool = True) -> int:
    """The one way a process that may run under torchrun ends its distributed work: the stage
    CLIs (:func:`pipeline.cli.run_stage`) and every script the tests and benches launch under
    torchrun end through it.

    Steps: with ``sync`` a barrier over the default process group (no rank destroys the gloo
    group while a peer still uses it, e.g. rank 0 still saving: that aborted the peer with
    ``terminate called without an active exception``); then :func:`teardown`; then, in a
    torchrun worker (:func:`is_torchrun_worker`), :func:`exit_worker` — the process ends here.
    Elsewhere (plain ``python``, an in-process call from a test) it returns ``code``.

    Args:
        code: the exit code of the process (0 success; the stages use 2 for user errors and 1
            for internal errors).
        sync: barrier before teardown. Pass False on an error path where the peers may never
            reach the barrier (it would hang) or when the caller has just passed one.
    Returns:
        ``code``, outside torchrun only.
    """
    if sync:
        barrier()
    teardown()
    if is_torchrun_worker():
        exit_worker(code)
    return code


def exit_worker(code: int) -> None:
    """End this process now with ``code``: stdout/stderr and logging are flushed, then
    ``os._exit``. Called by :func:`finish` in a torchrun worker once its work returned and the
    process group is destroyed; call :func:`finish` rather than this.

    Why: everything the process writes is closed by then (caches, loss logs, checkpoints,
    wandb's run is finished), and what is left is interpreter finalization, where C++ static
    destructors of the communication stack run beside the threads of a peer still tearing
    down — the window in which 2-rank runs beside a busy core sometimes aborted with
    ``terminate called without an active exception`` (SIGABRT after the work was done;
    torchrun then reported a failure). Skipping finalization closes that window; ``atexit``
    handlers do not run.
    """
    import logging
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0 only (flushes, so the line shows under torchrun at once)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks of a tensor on the process-group device; returns it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj: object) -> list[object]:
    """``all_gather_object``: every rank receives the list of all ranks' objects."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s object on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_rank0(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` run on rank 0 only; its result, or the exception it raised,
    reaches every rank.

    For work that must happen once (reading or preparing a directory, hashing a checkpoint,
    printing its warnings once) whose answer every rank needs. Collective: every rank of the
    default process group must call it, at the same point of its sequence of collectives
    (the arguments are used on rank 0 only). Without a process group, or with one rank, it is
    exactly ``fn(*args, **kwargs)``.

    Semantics: rank 0 returns ``fn``'s own result object; every other rank returns an
    unpickled copy of it (one ``broadcast_object_list`` of its pickled bytes), so the result
    must pickle on rank 0 and unpickle on every rank. When ``fn`` raises an ``Exception``,
    rank 0 re-raises that exception object (its traceback kept) and every other rank raises
    one of the same type with the same message (``args``) and attributes; traceback, cause
    and context stay on rank 0. So all ranks go on together, or all raise: none is left
    waiting in a collective the others never reach.

    Raises:
        Exception: what ``fn`` raised on rank 0, on every rank. An exception that cannot
            travel (a class that cannot be imported by name, such as one defined inside a
            function, or attributes that do not pickle) is raised on the other ranks as
            ``RuntimeError("TypeName: message")``.
        TypeError: with more than one rank, ``fn``'s result cannot be pickled (its type
            named), raised on every rank.
        BaseException: ``KeyboardInterrupt``, ``SystemExit`` and other non-``Exception``
            errors of ``fn`` are not caught: they leave rank 0 at once, as from any collective.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn(*args, **kwargs)
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 — every rank raises it below
            error = e
        if error is None:
            try:
                blob = pickle.dumps(("value", result), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as e:  # noqa: BLE001 — unpicklable result: every rank raises
                error = TypeError(f"on_rank0: the result of {getattr(fn, '__qualname__', fn)!r} "
                                  f"({type(result).__name__}) cannot be sent to the other ranks: {e}")
        if error is not None:
            blob = pickle.dumps(("error", _portable_exception(error)), protocol=pickle.HIGHEST_PROTOCOL)
    else:
        blob = None
    blob = broadcast_object(blob)
    if dist.get_rank() == 0:
        if error is not None:
            raise error
        return result
    kind, payload = pickle.loads(blob)
    if kind == "value":
        return payload
    raise _rebuild_exception(payload)


def _portable_exception(e: Exception) -> tuple:
    """How :func:`on_rank0` sends an exception to the other ranks (a picklable tuple):
    ``("pickle", e)`` when ``e`` survives a pickle round trip with its type and ``args``;
    else ``("fields", type, args, attributes)``, rebuilt without calling its ``__init__``
    (e.g. ``StorageError``, whose constructor takes four arguments), with its attributes or,
    if they do not pickle, without them; else ``("text", "TypeName: message")``. Each form is
    tried here, on rank 0, so the other ranks do not fail to rebuild it."""
    forms = [("pickle", e)] + [("fields", type(e), e.args, attrs) for attrs in (dict(getattr(e, "__dict__", {})), {})]
    for spec in forms:
        try:
            copy = _rebuild_exception(pickle.loads(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)))
            if type(copy) is type(e) and copy.args == e.args:
                return spec
        except Exception:  # noqa: BLE001 — try the next form
            pass
    return ("text", f"{type(e).__name__}: {e}")


def _rebuild_exception(spec: tuple) -> Exception:
    """The exception of a :func:`_portable_exception` tuple."""
    if spec[0] == "pickle":
        return spec[1]
    if spec[0] == "fields":
        _, cls, args, attrs = spec
        e = cls.__new__(cls, *args)
        e.args = args
        e.__dict__.update(attrs)
        return e
    return RuntimeError(spec[1])


def _transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated decoder blocks of a Hugging Face causal LM (``model.model.layers``)."""
    base = getattr(model, "base_model", model)
    for attr in ("layers", "h", "blocks"):
        blocks = getattr(base, attr, None)
        if isinstance(blocks, nn.ModuleList):
            return list(blocks)
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} to shard")


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}


def compute_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The FSDP2 parameter/compute dtype for a ``mixed_precision`` setting (None: float32).

    ``auto`` is bf16 on CUDA and float32 elsewhere (bf16 is ~6x slower on CPUs without bf16
    instructions, PLATFORM.md); ``no`` / ``bf16`` / ``fp16`` are taken as given on any device.
    """
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return PRECISION_DTYPES[mixed_precision]


def shard_model(model: nn.Module, *, mixed_precision: bool | torch.dtype | None = False,
                sum_gradients: bool = True) -> nn.Module:
    """Apply FSDP2 ``fully_shard`` to every transformer block, then to the root.

    With ``sum_gradients`` FSDP's own gradient averaging over ranks is switched off on every
    wrapped module (divide factor 1 and a plain SUM reduce-scatter, which gloo supports), so
    the caller's loss, already divided by the global valid-token count, gives the exact
    gradient of one big batch (torchtitan ``distributed/fsdp.py`` does the same).

    Args:
        mixed_precision: the dtype of the unsharded parameters and of the compute (bf16 or
            fp16; ``True`` means bf16), with gradients reduced in float32 and the sharded
            parameters kept float32 (they are what the optimizer and checkpoints see); False /
            None: float32 throughout. See :func:`compute_dtype`.
    Returns:
        The same module, now an ``FSDPModule``.
    """
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    dtype = torch.bfloat16 if mixed_precision is True else (mixed_precision or None)
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for block in _transformer_blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if sum_gradients:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Turn FSDP2's reduce-scatter on (last micro-step) or off (accumulation micro-steps);
    a module that is not FSDP-wrapped (unit tests) has nothing to sync."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(enabled)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU on rank 0 (``{}`` on the other ranks, PLATFORM.md trap 3).

    Collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
