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
