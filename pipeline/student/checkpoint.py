"""Exporting the student as a Hugging Face model directory (safetensors + config + tokenizer),
and verified sharded checkpoints ``checkpoints/step-NNNNNNNN/`` (DCP shards, ``trainer.pt``,
per-rank RNG, and ``checksums.json``: the size and sha256 of every other file, written last).

The run directory may be a URL (``s3://bucket/run``): an object store has no rename, so there
every object is written under its final name and completion is marked by the object written
last. A checkpoint on a store is complete when its ``checksums.json`` exists (written by rank 0
after every rank's shards and ``trainer.pt``; it records sizes, as hashing would download the
checkpoint); ``resume: auto`` lists ``checkpoints/`` and skips a prefix without it. An export
(``best/``, ``final/``) is staged locally and uploaded with ``config.json`` last. On a local
disk, temporary names and renames as described on each function.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from torch import nn

from pipeline.distributed import barrier, full_state_dict, on_rank0
from pipeline.storage.errors import fault_point, reading_checkpoint, writing
from pipeline.student.lora import ADAPTER_DIR, is_lora, save_adapter, split_export
from pipeline.models import TOKENIZER_FILES
from pipeline.storage import Folder



def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the tokenizer files of a HF directory into ``dst``."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


SAVE_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""``save_precision`` → the torch dtype name of the exported floating-point tensors."""


def cast_floating(state: dict, precision: str) -> dict:
    """``state`` with its floating-point tensors cast to ``SAVE_DTYPES[precision]`` (integer and
    bool buffers unchanged; tensors already in that dtype are not copied)."""
    import torch

    dtype = getattr(torch, SAVE_DTYPES[precision])
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in state.items()}


def _write_config_dtype(export: Path, precision: str) -> None:
    """Make ``config.json`` name the dtype of the saved weights: ``save_pretrained`` writes the
    in-memory model's (float32) as ``dtype`` (transformers 5; ``torch_dtype`` before, kept in
    step where present), which ``from_pretrained(dtype="auto")`` would load them as."""
    path = export / "config.json"
    if precision == "fp32" or not path.is_file():  # fp32: what save_pretrained wrote is right
        return
    cfg = json.loads(path.read_text())
    cfg["dtype"] = SAVE_DTYPES[precision]
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = SAVE_DTYPES[precision]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def export_hf(model: nn.Module, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None, rank: int,
              precision: str = "fp32") -> None:
    """Gather the full state dict (collective) and, on rank 0, write ``out_dir`` atomically
    (written to ``<out_dir>.tmp``, then renamed over any previous export; on a store: staged
    locally and uploaded with ``config.json`` last, :meth:`Folder.staged`). A LoRA student (pipeline/lora.py) is written merged (base +
    adapters), with the peft adapter directory in ``<out_dir>/adapter/``. ``precision``
    (``save_precision``: fp32 | bf16 | fp16) is the dtype of the written floating-point
    tensors, cast from the gathered float32 state on rank 0; config.json says the same."""
    state = full_state_dict(model)
    adapter = None
    if rank == 0 and is_lora(model):
        state, adapter = split_export(model, state)
    if rank == 0 and precision != "fp32":
        state, adapter = cast_floating(state, precision), (cast_floating(adapter, precision) if adapter else adapter)
    if rank == 0:
        # locally <out_dir>.tmp renamed over out_dir; on a store uploaded with config.json last
        # (an export without it is incomplete: HF loaders refuse it)
        with Folder(out_dir).staged(what="the model export", marker="config.json") as tmp:
            model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            _write_config_dtype(tmp, precision)
            if tokenizer_dir is not None:
                copy_tokenizer(tokenizer_dir, tmp)
            _write_adapter(model, adapter, tmp, tokenizer_dir)
    barrier()


def _write_adapter(model: nn.Module, adapter: dict | None, export: Path, tokenizer_dir) -> None:
    """A LoRA export's ``adapter/`` (peft format, with the tokenizer); nothing without adapters."""
    if adapter is not None:
        save_adapter(model, adapter, export / ADAPTER_DIR)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, export / ADAPTER_DIR)


# ----------------------------------------------------------------------------- sharded checkpoints
CKPT_PREFIX = "step-"


CHECKSUMS = "checksums.json"
"""The checkpoint's own manifest: ``{"format": 1, "step": N, "files": {relpath: {"size": bytes,
"sha256": hex}}}`` over every other file in the directory, written last, before the rename."""


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path] | list[str]:
    """Complete checkpoints of a run, oldest first (a checkpoint is complete once renamed from
    its temporary name; temporary directories are ignored). Not verified: see
    :func:`verify_checkpoint`. A run on a store: the URLs of every ``step-*`` prefix (one
    listing; one without its checksums file fails verification)."""
    root = Folder(run_dir).sub("checkpoints")  # on a store: prefixes, complete or not (verify_checkpoint tells)
    return [root.join(n) for n in root.list(dirs=True) if n.startswith(CKPT_PREFIX)]


def _file_sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _listed_files(folder: Folder) -> dict[str, int]:
    """``{relative path: size}`` of every file of a checkpoint but the checksums file."""
    return {k: v for k, v in sorted(folder.files().items()) if k.rsplit("/", 1)[-1] != CHECKSUMS}


def write_checksums(path: str | os.PathLike | Folder, step: int) -> None:
    """Record the size (and, on a local disk, the sha256: hashing on a store would download the
    checkpoint) of every file of the checkpoint directory ``path`` in :data:`CHECKSUMS`
    (locally atomically, ``.tmp`` then rename; one PUT on a store). Call it when every file is
    written: it is the checkpoint's commit point.

    Raises:
        OSError: a file cannot be read, or the checksums file cannot be written.
    """
    folder = path if isinstance(path, Folder) else Folder(path)
    files = {name: {"size": size, **({"sha256": _file_sha256(folder.join(name))} if folder.dir is not None else {})}
             for name, size in _listed_files(folder).items()}
    folder.write_bytes(CHECKSUMS, json.dumps({"format": 1, "step": step, "files": files}, indent=1).encode())


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """Check a checkpoint against its :data:`CHECKSUMS`; returns the first problem found (missing
    or unreadable checksums file, a listed file missing, a size or sha256 mismatch, a file not
    listed) or None when it passes.

    Cost: reads every byte of the checkpoint (sizes first, so a truncated file is found without
    hashing). This is the one place to make cheaper (e.g. sizes only, or sampled blocks). On a
    store: one listing and the checksums object (sizes only, see the module docstring).
    """
    folder = Folder(path)
    local = folder.dir is not None
    try:
        listed = json.loads(folder.read_bytes(CHECKSUMS))["files"]
    except FileNotFoundError:
        return f"no {CHECKSUMS} ({'incomplete, or written by an older version' if local else 'incomplete: its upload was interrupted'})"
    except ((OSError,) if local else ()) + (ValueError, KeyError, TypeError) as e:  # a store's OSError is raised
        return f"unreadable {CHECKSUMS} ({type(e).__name__}: {e})"
    stored = _listed_files(folder)
    for name in sorted(set(listed) - set(stored)):
        return f"{name} is missing"
    for name in sorted(set(stored) - set(listed)):
        return f"{name} is not in {CHECKSUMS}"
    for name, want in sorted(listed.items()):
        if stored[name] != want["size"]:
            return f"{name} has {stored[name]} bytes, {want['size']} recorded (truncated or changed)"
    for name, want in sorted(listed.items()) if local else ():  # hashing on a store would download it
        if _file_sha256(folder.join(name)) != want["sha256"]:
            return f"{name} sha256 mismatch (corrupt or changed)"
    return None


def _torch_bytes(obj) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _torch_load(folder: Folder, name: str):
    """``torch.load`` of the file ``name`` of ``folder`` (small files: read whole)."""
    import io

    import torch

    return torch.load(io.BytesIO(folder.read_bytes(name)), weights_only=False)


_FAULT_CALLS: dict[str, int] = {}


def _fault(point: str, rank: int) -> None:
    """Crash-test kill point (:func:`pipeline.storage.errors.fault_point`) at ``POINT``
    (``checkpoint_before_checksums``) of the N-th checkpoint this process writes."""
    _FAULT_CALLS[point] = _FAULT_CALLS.get(point, 0) + 1
    fault_point(point, _FAULT_CALLS[point], rank)


def resolve_resume(run_dir: str | os.PathLike, resume: str) -> Path | str | None:
    """The checkpoint to resume from for ``resume: auto|never|PATH`` (verified).

    ``auto``: the newest checkpoint of ``run_dir`` that passes :func:`verify_checkpoint`; each
    newer one that fails is skipped with a warning line on stderr naming it and the problem
    (None, start afresh, if none passes).

    Raises:
        FileNotFoundError: ``resume`` is a path that is not a complete checkpoint.
        ValueError: ``resume`` is a path to a checkpoint that fails verification (named).
    """
    if resume == "never":
        return None
    if resume == "auto":
        for p in reversed(complete_checkpoints(run_dir)):
            problem = verify_checkpoint(p)
            if problem is None:
                return p
            print(f"[checkpoint] warning: skipping {p}: fails verification: {problem}", file=sys.stderr, flush=True)
        return None
    folder = Folder(resume)
    p = folder.path
    if not folder.isfile("trainer.pt"):
        raise FileNotFoundError(f"resume: {p} is not a complete checkpoint (no trainer.pt)")
    problem = verify_checkpoint(p)
    if problem is not None:
        raise ValueError(f"resume: checkpoint {p} fails verification: {problem}")
    return p


def agree_resume(run_dir: str | os.PathLike, resume: str) -> Path | str | None:
    """:func:`resolve_resume` on rank 0 (hashing once, warnings once), the answer reaching
    every rank (:func:`pipeline.distributed.on_rank0`; collective).

    Raises:
        FileNotFoundError, ValueError: as :func:`resolve_resume`, on every rank.
    """
    return on_rank0(resolve_resume, run_dir, resume)


def _dcp_state(model: nn.Module, optimizer) -> dict:
    """Model and optimizer state for DCP. A model with frozen parameters (a LoRA student's base)
    keeps only its trainable ones: the frozen base never changes and is re-read from
    ``student.path`` when a run resumes."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    state = {k: v for k, v in get_model_state_dict(model).items() if k not in frozen}
    return {"model": state, "optim": get_optimizer_state_dict(model, optimizer)}


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer, scheduler, trainer_state: dict,
                    rank: int, keep: int) -> Path:
    """Write ``checkpoints/step-NNNNNNNN`` atomically (collective: every rank calls it).

    Sharded model and optimizer state go through ``torch.distributed.checkpoint`` (each rank
    writes its shards); rank 0 adds ``trainer.pt`` (LR scheduler + trainer state: round, epoch,
    step, data position, best eval, patience); every rank adds its RNG state. The directory is
    written under a temporary name; when all ranks are done rank 0 records the checksums of its
    files (:func:`write_checksums`) and renames it. Then checkpoints beyond the newest ``keep``
    are deleted, never the one just written (the newest that passes verification: an older run
    may have left a corrupt checkpoint of a later step).

    On a store (``run_dir`` a URL): rank 0 first removes whatever an interrupted attempt left
    under the step's prefix; every rank writes its DCP shards (``FsspecWriter``) and RNG state
    under their final names, then rank 0 ``trainer.pt`` and, last, ``checksums.json``: the
    commit point. Returns the checkpoint's URL there.

    Raises:
        StorageError: an I/O error while writing (disk full, store refused...).
    """
    import torch
    import torch.distributed.checkpoint as dcp

    ckpts = Folder(run_dir).sub("checkpoints")
    name = f"{CKPT_PREFIX}{step:08d}"
    final, work = ckpts.join(name), ckpts.scratch(name, f".tmp-{name}")
    if rank == 0:
        ckpts.makedirs()
        # locally the temporary directory; on a store what an interrupted attempt left under the
        # step's prefix (no checksums: never resumed from)
        with writing("checkpoint", final):
            work.remove()
    barrier()
    # an I/O error (full disk...) removes the temporary directory; older checkpoints are untouched
    with writing("checkpoint", final, *work.cleanup()):
        dcp.save(_dcp_state(model, optimizer), **work.dcp_target("writer"))
        work.write_bytes(f"rng-rank{rank}.pt", _torch_bytes({"torch": torch.get_rng_state()}), atomic=False)
    barrier()
    if rank == 0:
        with writing("checkpoint", final, *work.cleanup()):
            work.write_bytes("trainer.pt", _torch_bytes({"scheduler": scheduler.state_dict(), "trainer": trainer_state}))
            if work.is_remote:  # the crash tests' kill point (a store: between trainer.pt and the commit object)
                _fault("checkpoint_before_checksums", rank)
            write_checksums(work, step)  # last: a checkpoint without it fails verification
        ckpts.commit(name, work)
        with writing("checkpoint", final):
            for old in complete_checkpoints(run_dir)[:-keep]:
                if old != final:
                    Folder(old).remove()
    barrier()
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, scheduler, rank: int) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path``; returns the trainer
    state dict saved with it (collective). Works across world sizes (DCP reshards)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    folder = Folder(path)
    state = _dcp_state(model, optimizer)
    with reading_checkpoint(folder.path):
        dcp.load(state, **folder.dcp_target("reader"))
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))  # frozen: not saved
        set_optimizer_state_dict(model, optimizer, state["optim"])
    extra = _torch_load(folder, "trainer.pt")
    scheduler.load_state_dict(extra["scheduler"])
    if folder.isfile(f"rng-rank{rank}.pt"):
        torch.set_rng_state(_torch_load(folder, f"rng-rank{rank}.pt")["torch"])
    return extra["trainer"]


def save_optimizer(path: str | os.PathLike, model: nn.Module, optimizer, rank: int) -> None:
    """Sharded optimizer state alone (DCP), for the next round's ``carry_optimizer`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    folder = Folder(path)
    if rank == 0:
        folder.remove()
    barrier()
    with writing("the optimizer state", path):
        dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, **folder.dcp_target("writer"))
    barrier()


def load_optimizer_moments(path: str | os.PathLike, model: nn.Module, optimizer) -> None:
    """Load an optimizer state saved by :func:`save_optimizer` but keep the current parameter
    groups' hyperparameters (lr, initial_lr, betas, eps, weight decay) (collective).

    Raises:
        FileNotFoundError: no saved state at ``path``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    folder = Folder(path)
    if not folder.isdir():
        raise FileNotFoundError(f"carry_optimizer: no optimizer state of the previous round at {path}")
    hparams = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = {"optim": get_optimizer_state_dict(model, optimizer)}
    with reading_checkpoint(path, "the previous round's optimizer state"):
        dcp.load(state, **folder.dcp_target("reader"))
        set_optimizer_state_dict(model, optimizer, state["optim"])
    for g, hp in zip(optimizer.param_groups, hparams):
        g.update(hp)
