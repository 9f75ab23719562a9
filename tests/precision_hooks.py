"""A callback used by tests/test_precision_router.py (loaded by import path in-process and under
torchrun): forces an fp16 gradient overflow in one optimizer step and records, per rank and
step, a checksum of this rank's parameter shards and AdamW state."""
from __future__ import annotations

import json

import torch


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class ForceOverflow:
    """Multiplies the gradient flowing out of the final norm by inf during the backward pass of
    step ``at_step`` (or of each step of a list; on rank ``rank`` only, or every rank when None):
    every parameter upstream gets an inf/NaN gradient while the loss stays finite — a loss-scale
    overflow."""

    def __init__(self, at_step: int | list[int], log: str, rank: int | None = None):
        self.steps = {at_step} if isinstance(at_step, int) else set(at_step)
        self.log, self.rank = log, rank
        self.state = None

    def on_train_begin(self, state):
        self.state = state
        norm = state.model.model.norm  # Llama / Mixtral final norm, inside the FSDP2 root

        def hook(module, args, out):
            st = self.state
            if out.requires_grad and st.step + 1 in self.steps and self.rank in (None, st.rank):
                out.register_hook(lambda g: g * float("inf"))

        norm.register_forward_hook(hook)

    def on_step_end(self, state, metrics):
        params = [_local(p.detach()).double().sum().item() for p in state.model.parameters()]
        opt = [_local(v).double().sum().item() for s in state.optimizer.state.values() for v in s.values()
               if torch.is_tensor(v)]
        with open(f"{self.log}.rank{state.rank}.jsonl", "a") as fh:
            fh.write(json.dumps({"step": state.step, "params": params, "opt": opt,
                                 "loss_scale": metrics.get("train/loss_scale"),
                                 "overflow_steps": metrics.get("train/overflow_steps")}) + "\n")
