"""Loading teachers, building students, tokenizers and fingerprints.

Everything is loaded from local paths; nothing is downloaded at run time.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn


def _require_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained`` on a local directory.

    Raises:
        FileNotFoundError: the directory does not exist or holds no tokenizer.
    """
    from transformers import AutoTokenizer

    p = _require_dir(path, "tokenizer directory")
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no loadable tokenizer in {p}: {str(e).splitlines()[0]}") from e


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
    """
    from transformers import AutoModelForCausalLM

    p = _require_dir(path, "teacher directory")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"teacher directory has no config.json: {p}")
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def build_student(path: str | os.PathLike, init: str, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The student causal LM, from a HF directory or a bare ``config.json``.

    Args:
        path: directory with ``config.json`` (and weights for ``init='pretrained'``), or the
            ``config.json`` file itself.
        init: ``random`` (weights drawn with ``torch.manual_seed(seed)``) or ``pretrained``.
    Raises:
        FileNotFoundError: the path or its config is missing.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    p = _require_dir(path, "student path")
    if init == "pretrained":
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    else:
        config = AutoConfig.from_pretrained(str(p.parent if p.is_file() else p))
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config.use_cache = False
    return model


def vocab_size(model: nn.Module) -> int:
    """Size V of the model's output logits (may exceed the tokenizer's vocabulary when padded)."""
    return int(model.get_output_embeddings().weight.shape[0])


def count_parameters(model: nn.Module) -> int:
    """Number of unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class OutputProjection(nn.Module):
    """Stands in for a causal LM's output layer: holds its parameters under the same names
    (``weight`` (V, H), ``bias`` (V,) or None; a tied ``weight`` stays the input embedding's
    Parameter) and returns its input, so the model's "logits" are the final hidden states
    (B, T, H) and the projection happens inside the fused loss (pipeline/losses.py).

    State-dict keys, FSDP2 parameter groups and Hugging Face export are unchanged.
    """

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.weight = linear.weight
        self.bias = getattr(linear, "bias", None)
        self.out_features, self.in_features = self.weight.shape

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def defer_output_projection(model: nn.Module) -> OutputProjection:
    """Replace the model's output layer by an :class:`OutputProjection` (idempotent).

    Call it before ``fully_shard`` (FSDP2 records the modules that own each parameter).
    Linear rescaling of the logits by the model (Granite's ``logits_scaling``, Cohere's
    ``logit_scale``) acts on the hidden states instead and gives the same logits.

    Returns:
        The :class:`OutputProjection` now at ``model.get_output_embeddings()``.
    Raises:
        TypeError: the model is already FSDP-wrapped with its original output layer, or has
            no output layer.
        ValueError: the model soft-caps its logits (``final_logit_softcapping``, e.g. Gemma 2),
            a non-linear map the fused loss does not apply.
    """
    head = model.get_output_embeddings()
    if isinstance(head, OutputProjection):
        return head
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__} has no output layer with a weight")
    if getattr(model.config, "final_logit_softcapping", None):
        raise ValueError(f"{type(model).__name__} soft-caps its logits (final_logit_softcapping="
                         f"{model.config.final_logit_softcapping}); the fused output loss does not support it")
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        raise TypeError("defer_output_projection must be called before fully_shard (pipeline.distributed.shard_model)")
    proj = OutputProjection(head)
    model.set_output_embeddings(proj)
    return proj
