"""Checks and steps shared by whole-model loading (:mod:`~pipeline.models.load`) and sharded
loading (:mod:`~pipeline.models.sharded`): the model directory and its ``config.json``, the
load errors as one line naming the path, and the teacher/student role of a loaded model."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.storage.errors import one_line


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path (a directory or, for a student, a ``config.json`` file).

    Raises:
        FileNotFoundError: ``path`` does not exist (``what`` and the path named).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def check_config(p: Path, what: str) -> None:
    """``config.json`` of a model directory (or ``p`` itself, a config file) is a JSON object.

    Args:
        p: the model directory or its config file.
        what: the model's role in messages (``teacher``, ``student``, ``model``).
    Raises:
        FileNotFoundError: no config.json.
        ValueError: not valid JSON (line and column named), not UTF-8, or not an object.
    """
    f = p if p.is_file() else p / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{what} has no config.json: {p}")
    try:
        cfg = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} config {f} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} config {f}: not UTF-8 text (byte offset {e.start})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{what} config {f}: a JSON {type(cfg).__name__}, expected an object")


def unreadable_weights(what: str, file: Path, reason: str) -> ValueError:
    """The error (returned, not raised) for a truncated or corrupt weight file of the ``what``
    (student/teacher): a ValueError naming the file and ``reason``, why it does not read."""
    return ValueError(f"{what} weights unreadable (truncated or corrupt): {file} ({reason})")


def _bad_weight_file(p: Path) -> tuple[Path, str] | None:
    """The first ``*.safetensors`` file in ``p`` whose header does not open (truncated, not
    safetensors) and the reason; None if all open."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(p.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except (SafetensorError, OSError) as e:
            return f, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def from_pretrained(p: Path, what: str, dtype: torch.dtype) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` of the directory ``p``, whole, parameters of
    ``dtype``, with its load errors as one line naming the path.

    Raises:
        FileNotFoundError: no weight files in ``p``.
        ValueError: a truncated or corrupt weight file (named, :func:`unreadable_weights`), a
            config transformers refuses (unknown model type...), weights that do not fit the
            config.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        bad = _bad_weight_file(p)
        if bad is not None:
            raise unreadable_weights(what, *bad) from e
        first = one_line(e, first=True)
        if isinstance(e, OSError) and not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
            raise FileNotFoundError(f"{what} {p} has no weights (model.safetensors): {first}") from e
        raise ValueError(f"{what} {p} cannot be loaded ({type(e).__name__}: {first})") from e


def auto_config(p: Path, what: str):
    """``AutoConfig.from_pretrained`` of the model directory ``p`` (a transformers
    ``PretrainedConfig``).

    Raises:
        ValueError: transformers refuses the config (unknown model type...; ``p`` named).
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(p))
    except (OSError, ValueError, KeyError) as e:
        first = one_line(e, first=True)
        raise ValueError(f"{what} config {p} cannot be loaded ({type(e).__name__}: {first})") from e


def set_role(model: nn.Module, frozen: bool) -> nn.Module:
    """Make ``model`` a teacher (``frozen``: eval mode, no gradients) or a student (train mode,
    every parameter trainable, ``config.use_cache = False``: no KV cache); returns ``model``
    (changed in place)."""
    model.train(not frozen)
    model.requires_grad_(not frozen)
    if not frozen:
        model.config.use_cache = False
    return model
