"""Checkpoint tensor names → the model's parameter names, mapped the way the installed
transformers maps them when ``from_pretrained`` loads a checkpoint (transformers 5:
``conversion_mapping.get_model_conversion_mapping`` and ``core_model_loading.rename_source_key``).

Two kinds of mapping are served, both readable row by row (FSDP2 shards every parameter along
dim 0, so a rank reads only its rows):

- **renames** (``WeightRenaming``): one checkpoint tensor is one parameter under another name,
  e.g. GPT-NeoX's ``embed_out.weight`` → ``lm_head.weight``, a base-model prefix added or dropped;
- **stacked experts** (``WeightConverter`` with ``MergeModulelist(dim=0)``, then optionally
  ``Concatenate(dim ≥ 1)``): the per-expert tensors ``experts.{e}.gate_proj.weight`` (I, H),
  ``experts.{e}.up_proj.weight`` (I, H) become ``experts.gate_up_proj`` (E, 2I, H), rows of dim 0
  being experts (Qwen2-MoE, Qwen3-MoE, Mixtral...): rows ``[a, b)`` are experts ``a..b-1``.

Any other conversion, a checkpoint tensor that maps to nothing, and a parameter no tensor maps
to are refused in one line naming the tensor (or parameter) and the model class.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from torch import nn


@dataclass(frozen=True)
class Source:
    """Where one parameter's (or persistent buffer's) values are in the checkpoint.

    Attributes:
        parts: checkpoint tensor names, one tuple per concatenated part. A renamed tensor: one
            part of one name, read as it is. Stacked experts: per part one name per expert, in
            expert order, stacked along dim 0; the stacked parts are concatenated along
            ``concat_dim``.
        experts: True for stacked experts.
        concat_dim: the dimension of the parts' concatenation (stacked experts only).
    """

    parts: tuple[tuple[str, ...], ...]
    experts: bool = False
    concat_dim: int = 1

    def full_shape(self, shape_of) -> tuple[int, ...]:
        """The parameter's shape this source gives, from ``shape_of(tensor name)`` (the
        checkpoint shapes). Raises ValueError when an expert's shape differs from the first's
        of its part (both named)."""
        if not self.experts:
            return tuple(shape_of(self.parts[0][0]))
        shapes = []
        for part in self.parts:
            first = tuple(shape_of(part[0]))
            for name in part[1:]:
                if tuple(shape_of(name)) != first:
                    raise ValueError(f"expert tensor {name} has shape {tuple(shape_of(name))}, {part[0]} {first}")
            shapes.append([len(part), *first])
        out = list(shapes[0])
        out[self.concat_dim] = sum(s[self.concat_dim] for s in shapes)
        return tuple(out)


def _natural(key: str) -> list:
    """Sort key ordering dotted names by their numeric parts as numbers (``experts.2`` before
    ``experts.10``), the order transformers stacks experts in (``dot_natural_key``)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key) if t]


class _Refused(ValueError):
    pass


def _transforms(model: nn.Module):
    """transformers' renamings and converters for ``model`` and its ``rename_source_key``;
    None with transformers 4 (no conversion mapping there: only ``_checkpoint_conversion_mapping``)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters, rename_source_key


def _rename_v4(model: nn.Module, key: str, targets: dict) -> str:
    """transformers 4's renaming: the first matching ``_checkpoint_conversion_mapping`` regex,
    then the base-model prefix added or dropped where that names a model key."""
    for pattern, replacement in (getattr(model, "_checkpoint_conversion_mapping", None) or {}).items():
        key, n = re.subn(pattern, replacement, key)
        if n:
            break
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and key not in targets:
        if key.startswith(prefix + ".") and key[len(prefix) + 1:] in targets:
            return key[len(prefix) + 1:]
        if f"{prefix}.{key}" in targets:
            return f"{prefix}.{key}"
    return key


def _experts_concat_dim(converter, key: str, cls: str) -> int:
    """The ``Concatenate`` dimension of a stacked-experts converter (1 when it only stacks).

    Raises:
        _Refused: any other conversion (the tensor, the operations and the class named).
    """
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = list(getattr(converter, "operations", []))
    if ops and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0:
        if len(ops) == 1 and len(converter.source_patterns) == 1:
            return 1
        if len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim >= 1:
            return ops[1].dim
    raise _Refused(f"checkpoint tensor {key} is converted by {ops} for {cls}; the row-sharded loader reads only "
                   "renamed tensors and stacked experts (MergeModulelist(dim=0), then Concatenate)")


def map_checkpoint(model: nn.Module, names: Iterable[str], what: str, path: Path) -> dict[str, Source]:
    """Where each parameter and persistent buffer of ``model`` is in a checkpoint with tensors
    ``names``, renamed and converted as the installed transformers would on load.

    A checkpoint tensor that names a tied parameter's second name (``lm_head.weight`` beside
    the input embedding) or matches the model's ``_keys_to_ignore_on_load_unexpected`` is
    skipped, as ``from_pretrained`` skips it.

    Args:
        model: the model built from ``config.json`` (parameters may be on the meta device).
        names: the checkpoint's tensor names.
        what, path: the role (teacher/student) and directory, for messages.
    Returns:
        parameter or buffer name (as in ``model.state_dict()``) → :class:`Source`.
    Raises:
        ValueError: a checkpoint tensor maps to no parameter, a conversion other than renames
            and stacked experts, or a parameter with no tensor (one line: the ``what``, the
            path, the tensor or parameter, the model class).
    """
    cls = type(model).__name__
    params = dict(model.named_parameters())
    state = model.state_dict(keep_vars=True)
    buffers = {n for n, _ in model.named_buffers()} & set(state)
    targets = dict.fromkeys(state, True)  # what rename_source_key looks names up in
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
    tr = _transforms(model)
    plain: dict[str, Source] = {}
    stacked: dict[str, tuple[object, dict[str, list[str]]]] = {}
    try:
        for key in sorted(names, key=_natural):
            pattern, converter = None, None
            if tr is None:
                renamed = _rename_v4(model, key, targets)
            else:
                renamings, converters, rename = tr
                renamed, pattern = rename(key, renamings, converters, getattr(model, "base_model_prefix", None), targets)
                if renamed not in targets and key in targets:  # as transformers: keep the name, fix the prefix only
                    renamed, pattern = rename(key, [], [], getattr(model, "base_model_prefix", None), targets)
                if pattern is not None:
                    converter = next(c for c in converters if pattern in c.source_patterns)
            if renamed not in params and renamed not in buffers:
                if renamed in state or any(p.search(key) for p in ignore):
                    continue  # a tied parameter's second name: the model ties it after loading
                raise _Refused(f"checkpoint tensor {key} (as {renamed}) is no parameter of {cls}")
            if converter is None:
                if renamed in plain:
                    raise _Refused(f"checkpoint tensors {plain[renamed].parts[0][0]} and {key} both map to {renamed} of {cls}")
                plain[renamed] = Source(((key,),))
            else:
                stacked.setdefault(renamed, (converter, {}))[1].setdefault(pattern, []).append(key)
        out = dict(plain)
        for name, (converter, by_pattern) in stacked.items():
            first = next(iter(by_pattern.values()))[0]
            dim = _experts_concat_dim(converter, first, cls)
            missing = [p for p in converter.source_patterns if p not in by_pattern]
            if missing:
                raise _Refused(f"parameter {name} of {cls}: no checkpoint tensor matches {missing[0]} (beside {first})")
            out[name] = Source(tuple(tuple(by_pattern[p]) for p in converter.source_patterns), experts=True,
                               concat_dim=dim)
        for name in params:
            if name not in out:
                raise _Refused(f"parameter {name} of {cls} has no tensor in the checkpoint")
    except _Refused as e:
        raise ValueError(f"{what} {path}: {e}") from None
    return out
