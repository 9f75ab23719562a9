"""Exporting the student as a Hugging Face model directory (safetensors + config + tokenizer)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from torch import nn

from pipeline.distributed import barrier, full_state_dict

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the tokenizer files of a HF directory into ``dst``."""
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)


def export_hf(model: nn.Module, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None, rank: int) -> None:
    """Gather the full state dict (collective) and, on rank 0, write ``out_dir`` atomically
    (written to ``<out_dir>.tmp``, then renamed over any previous export)."""
    state = full_state_dict(model)
    if rank == 0:
        out, tmp = Path(out_dir), Path(str(out_dir) + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    barrier()


# ----------------------------------------------------------------------------- sharded checkpoints
CKPT_PREFIX = "step-"


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a checkpoint is complete once renamed from
    its temporary name; temporary directories are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))


def resolve_resume(run_dir: str | os.PathLike, resume: str) -> Path | None:
    """The checkpoint to resume from for ``resume: auto|never|PATH``.

    Raises:
        FileNotFoundError: ``resume`` is a path that is not a complete checkpoint.
    """
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    p = Path(resume)
    if not (p / "trainer.pt").is_file():
        raise FileNotFoundError(f"resume: {p} is not a complete checkpoint (no trainer.pt)")
    return p


def _dcp_state(model: nn.Module, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer, scheduler, trainer_state: dict,
                    rank: int, keep: int) -> Path:
    """Write ``checkpoints/step-NNNNNNNN`` atomically (collective: every rank calls it).

    Sharded model and optimizer state go through ``torch.distributed.checkpoint`` (each rank
    writes its shards); rank 0 adds ``trainer.pt`` (LR scheduler + trainer state: round, epoch,
    step, data position, best eval, patience); every rank adds its RNG state. The directory is
    written under a temporary name and renamed when all ranks are done; then checkpoints beyond
    the newest ``keep`` are deleted.
    """
    import torch
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"{CKPT_PREFIX}{step:08d}", root / f".tmp-{CKPT_PREFIX}{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp))
    torch.save({"torch": torch.get_rng_state()}, tmp / f"rng-rank{rank}.pt")
    barrier()
    if rank == 0:
        torch.save({"scheduler": scheduler.state_dict(), "trainer": trainer_state}, tmp / "trainer.pt.tmp")
        os.replace(tmp / "trainer.pt.tmp", tmp / "trainer.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer, scheduler, rank: int) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path``; returns the trainer
    state dict saved with it (collective). Works across world sizes (DCP reshards)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    state = _dcp_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    extra = torch.load(path / "trainer.pt", weights_only=False)
    scheduler.load_state_dict(extra["scheduler"])
    rng = path / f"rng-rank{rank}.pt"
    if rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=False)["torch"])
    return extra["trainer"]


def save_optimizer(path: str | os.PathLike, model: nn.Module, optimizer, rank: int) -> None:
    """Sharded optimizer state alone (DCP), for the next round's ``carry_optimizer`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    barrier()
    dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=str(path))
    barrier()


def load_optimizer_moments(path: str | os.PathLike, model: nn.Module, optimizer) -> None:
    """Load an optimizer state saved by :func:`save_optimizer` but keep the current parameter
    groups' hyperparameters (lr, initial_lr, betas, eps, weight decay) (collective).

    Raises:
        FileNotFoundError: no saved state at ``path``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if not Path(path).is_dir():
        raise FileNotFoundError(f"carry_optimizer: no optimizer state of the previous round at {path}")
    hparams = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = {"optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, state["optim"])
    for g, hp in zip(optimizer.param_groups, hparams):
        g.update(hp)
