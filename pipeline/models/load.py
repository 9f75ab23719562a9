"""Loading teachers, building students, tokenizers and fingerprints (whole models, one process)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.storage.errors import one_line


def _require_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path. Raises FileNotFoundError naming ``what`` when it does not exist."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def _check_config(p: Path, what: str) -> None:
    """``config.json`` of a model directory (or ``p`` itself, a config file) is a JSON object.

    Raises:
        FileNotFoundError: no config.json.
        ValueError: not valid JSON (line and column named) or not an object.
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


def _unreadable_weights(what: str, file: Path, reason: str) -> ValueError:
    """The error for a truncated or corrupt weight file of the ``what`` (student/teacher),
    naming the file and why it does not read."""
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


def _from_pretrained(p: Path, what: str, dtype: torch.dtype) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with its load errors as one line naming the path.

    Raises:
        FileNotFoundError: no weight files in ``p``.
        ValueError: a truncated or corrupt weight file (named), a config transformers refuses
            (unknown model type...), weights that do not fit the config.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        bad = _bad_weight_file(p)
        if bad is not None:
            raise _unreadable_weights(what, *bad) from e
        first = one_line(e, first=True)
        if isinstance(e, OSError) and not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
            raise FileNotFoundError(f"{what} {p} has no weights (model.safetensors): {first}") from e
        raise ValueError(f"{what} {p} cannot be loaded ({type(e).__name__}: {first})") from e


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "vocab.json", "merges.txt")
"""The files of a Hugging Face tokenizer directory: what exports copy next to the weights."""
_TOKENIZER_DEFINITIONS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def has_tokenizer(path: str | os.PathLike) -> bool:
    """True when the directory ``path`` holds a tokenizer definition (``tokenizer.json``,
    ``tokenizer_config.json`` or ``tokenizer.model``), the files ``load_tokenizer`` reads."""
    return any((Path(path) / f).is_file() for f in _TOKENIZER_DEFINITIONS)


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained`` on a local directory.

    Raises:
        FileNotFoundError: the directory does not exist or holds no loadable tokenizer (a
            missing, invalid or truncated tokenizer.json...; the directory and the first line of
            the loader's message are named).
        ValueError: the directory's config.json is not valid JSON (line and column named).
    """
    from transformers import AutoTokenizer

    p = _require_dir(path, "tokenizer directory")
    if (p / "config.json").is_file():  # AutoTokenizer reads a model directory's config.json too
        _check_config(p, "model")
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:
        # tokenizers (Rust) raises a bare Exception for a tokenizer.json it cannot parse; the
        # Python side raises OSError / ValueError / KeyError / TypeError. Anything else is a bug.
        if not (type(e) is Exception or isinstance(e, (OSError, ValueError, KeyError, TypeError))):
            raise
        first = one_line(e, first=True)
        raise FileNotFoundError(f"no loadable tokenizer in {p}: {type(e).__name__}: {first}") from e


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (hex, 16 chars) of the tokenizer's full serialised definition (vocab, merges,
    normaliser, special tokens): two tokenizers with equal fingerprints tokenize identically."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_fingerprint(path: str | os.PathLike) -> str:
    """sha256 (hex, 16 chars) over ``config.json`` and every weight file's bytes in the directory."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p / "config.json"] + sorted(list(p.glob("*.safetensors")) + list(p.glob("*.bin")))
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def load_teacher(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A frozen causal LM in eval mode with ``requires_grad=False`` on every parameter.

    Raises:
        FileNotFoundError: the directory or its config/weights are missing.
        ValueError: config.json is not valid JSON (line named), a weight file is truncated or
            corrupt (named), or transformers refuses the model (see :func:`_from_pretrained`).
    """
    p = _require_dir(path, "teacher directory")
    _check_config(p, "teacher")
    return _set_role(_from_pretrained(p, "teacher", dtype), frozen=True)


def _auto_config(p: Path, what: str):
    """``AutoConfig.from_pretrained`` of the model directory ``p``.

    Raises:
        ValueError: transformers refuses the config (unknown model type...; ``p`` named).
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(p))
    except (OSError, ValueError, KeyError) as e:
        first = one_line(e, first=True)
        raise ValueError(f"{what} config {p} cannot be loaded ({type(e).__name__}: {first})") from e


def _set_role(model: nn.Module, frozen: bool) -> nn.Module:
    """A teacher (``frozen``: eval mode, no gradients) or a student (train mode, every
    parameter trainable, no KV cache); returns ``model``."""
    model.train(not frozen)
    model.requires_grad_(not frozen)
    if not frozen:
        model.config.use_cache = False
    return model


def build_student(path: str | os.PathLike, init: str, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The student causal LM, from a HF directory or a bare ``config.json``, whole on this
    rank (:func:`load_student_sharded` loads a pretrained one sharded).

    Args:
        path: directory with ``config.json`` (and weights for ``init='pretrained'``), or the
            ``config.json`` file itself.
        init: ``random`` (weights drawn with ``torch.manual_seed(seed)``) or ``pretrained``.
    Returns:
        The model in train mode, parameters of ``dtype``, ``config.use_cache = False``.
    Raises:
        FileNotFoundError: the path, its config or (pretrained) its weights are missing.
        ValueError: config.json is not valid JSON (line named), a weight file is truncated or
            corrupt (named), or transformers refuses the config.
    """
    from transformers import AutoModelForCausalLM

    p = _require_dir(path, "student path")
    _check_config(p, "student")
    d = p.parent if p.is_file() else p
    if init == "pretrained":
        return _set_role(_from_pretrained(d, "student", dtype), frozen=False)
    config = _auto_config(d, "student")
    torch.manual_seed(seed)
    return _set_role(AutoModelForCausalLM.from_config(config, dtype=dtype), frozen=False)


