"""The output head: vocabulary size, parameter counts, and the deferred output projection the
fused losses (stage 1 top-k, stage 2 KD loss) apply chunk by chunk."""
from __future__ import annotations


import torch
from torch import nn



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
    (B, T, H) and the projection happens inside the fused loss (pipeline/student/fused_driver.py)
    or the teacher's fused targets (pipeline/teacher/topk.py).

    ``softcap`` is the model's logit soft-cap ``c`` (``final_logit_softcapping``, Gemma 2:
    ``logits = c · tanh(z / c)`` after the output layer), or None: the fused paths apply it to
    each chunk of projected logits (:func:`pipeline.numerics.softcap_`), since the model no longer
    sees the logits.

    State-dict keys, FSDP2 parameter groups and Hugging Face export are unchanged.
    """

    def __init__(self, linear: nn.Module, softcap: float | None = None):
        super().__init__()
        self.weight = linear.weight
        self.bias = getattr(linear, "bias", None)
        self.out_features, self.in_features = self.weight.shape
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def _logit_softcap(model: nn.Module) -> float | None:
    """The model's ``final_logit_softcapping`` (None when unset).

    Raises:
        ValueError: a cap that is not a positive number, or one set only on a nested text config
            (the deferred projection cannot switch it off there); both name the model class.
    """
    cfg = model.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if cap is None and text is not cfg and getattr(text, "final_logit_softcapping", None) is not None:
        raise ValueError(f"{type(model).__name__} soft-caps its logits through a nested text config; the fused "
                         "output layer can only take the cap of the model's own config.final_logit_softcapping")
    if cap is not None and not (isinstance(cap, (int, float)) and cap > 0):
        raise ValueError(f"{type(model).__name__}: final_logit_softcapping={cap!r} is not a positive number; "
                         "the fused output layer cannot apply it")
    return None if cap is None else float(cap)


def _cap_outside_forward(model: nn.Module, cap: float) -> None:
    """Keep the model's forward from soft-capping what is now its final hidden states: its
    ``config.final_logit_softcapping`` reads None during each forward call (hooks on the root
    module), and the cap again outside it, so a saved or exported config keeps it."""
    cfg = model.config

    def hide(module, args):
        cfg.final_logit_softcapping = None

    def restore(module, args, output):
        cfg.final_logit_softcapping = cap

    model.register_forward_pre_hook(hide)
    model.register_forward_hook(restore, always_call=True)  # also when the forward raises


def defer_output_projection(model: nn.Module) -> OutputProjection:
    """Replace the model's output layer by an :class:`OutputProjection` (idempotent).

    Call it before ``fully_shard`` (FSDP2 records the modules that own each parameter).
    Linear rescaling of the logits by the model (Granite's ``logits_scaling``, Cohere's
    ``logit_scale``) acts on the hidden states instead and gives the same logits. A logit
    soft-cap (``final_logit_softcapping``, Gemma 2) is kept as ``OutputProjection.softcap`` and
    applied by the fused paths; the model's forward stops applying it to the hidden states.

    Returns:
        The :class:`OutputProjection` now at ``model.get_output_embeddings()``.
    Raises:
        TypeError: the model is already FSDP-wrapped with its original output layer, or has
            no output layer.
        ValueError: a soft-cap the fused paths cannot apply (not a positive number, or set on a
            nested text config only).
    """
    head = model.get_output_embeddings()
    if isinstance(head, OutputProjection):
        return head
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__} has no output layer with a weight")
    cap = _logit_softcap(model)
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        raise TypeError("defer_output_projection must be called before fully_shard (pipeline.distributed.shard_model)")
    proj = OutputProjection(head, cap)
    model.set_output_embeddings(proj)
    if cap is not None:
        _cap_outside_forward(model, cap)
    return proj


def refuse_zero_output_layer(model: nn.Module, path: str) -> None:
    """Refuse a pretrained model whose output layer's weight is all zeros: every logit would be
    equal (a broken checkpoint or load; training would start from CE = log V). Collective under
    FSDP2 (each rank counts the non-zeros of its rows, summed over ranks); call it on every rank
    once the weights are loaded.

    Raises:
        ValueError: one line naming ``path``, the same on every rank.
    """
    from torch.distributed.tensor import DTensor

    from pipeline.distributed import all_reduce_sum

    weight = model.get_output_embeddings().weight
    local = weight.to_local() if isinstance(weight, DTensor) else weight
    nonzero = all_reduce_sum(torch.tensor([float(torch.count_nonzero(local.detach()))], device=local.device))
    if nonzero.item() == 0:
        raise ValueError(f"student {path}: its output layer {tuple(weight.shape)} is all zeros, every logit would be "
                         f"equal; a broken checkpoint or load (student.init: pretrained)")
