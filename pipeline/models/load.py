"""Loading teachers, building students, tokenizers and fingerprints (whole models, one process)."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from pipeline.models.common import auto_config, check_config, from_pretrained, require_dir, set_role
from pipeline.storage.errors import one_line


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

    p = require_dir(path, "tokenizer directory")
    if (p / "config.json").is_file():  # AutoTokenizer reads a model directory's config.json too
        check_config(p, "model")
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
            corrupt (named), or transformers refuses the model (see
            :func:`~pipeline.models.common.from_pretrained`).
    """
    p = require_dir(path, "teacher directory")
    check_config(p, "teacher")
    return set_role(from_pretrained(p, "teacher", dtype), frozen=True)


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

    p = require_dir(path, "student path")
    check_config(p, "student")
    d = p.parent if p.is_file() else p
    if init == "pretrained":
        return set_role(from_pretrained(d, "student", dtype), frozen=False)
    config = auto_config(d, "student")
    torch.manual_seed(seed)
    return set_role(AutoModelForCausalLM.from_config(config, dtype=dtype), frozen=False)


