"""Token-by-token sampling with the model's KV cache, batch-invariant by construction.

Each completion (prompt ``P``, index ``j``) owns a CPU ``torch.Generator`` seeded from
``(seed, P, j)`` (:func:`completion_seed`) that gives one uniform number per step; the token is
the inverse CDF of that row's filtered distribution at it (:func:`draw_tokens`). A row's
logits depend on its own tokens only: prompts are left-padded, the attention mask hides the
padding, and position IDs count the row's real tokens (0 at its first token), so a prompt gets
the same logits alone or among prompts of other lengths (up to the float rounding of batched
kernels; generate-completions also fixes each batch's composition, see
:mod:`pipeline.generation.run`). The draws never depend on the batch or the device.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from pipeline.config import SamplingConfig


def completion_seed(seed: int, prompt_id: str, j: int) -> int:
    """63-bit generator seed of completion ``j`` of prompt ``prompt_id`` (stable across
    processes, unlike Python's salted ``hash``): the first 8 bytes of
    ``sha256(f"{seed}\\0{prompt_id}\\0{j}")``."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}\0{j}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def next_token_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The filtered next-token distribution of each row.

    Args:
        logits: (B, V) float32 logits of the last position.
        temperature: > 0 (the greedy case never calls this).
        top_k: keep the ``top_k`` largest logits of a row (ties at the threshold kept); 0: all.
        top_p: keep the smallest prefix of the row's tokens sorted by probability (descending,
            stable) whose mass reaches ``top_p``; the most likely token is always kept; 1: all.
    Returns:
        (B, V) float64 probabilities, each row summing to 1, zero outside the kept tokens.
    """
    z = logits.double() / temperature
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    p = torch.softmax(z, dim=-1)
    if top_p < 1.0:
        sp, order = torch.sort(p, dim=-1, descending=True, stable=True)
        before = sp.cumsum(-1) - sp  # mass of the more likely tokens
        drop = before >= top_p
        drop[:, 0] = False
        sp = sp.masked_fill(drop, 0.0)
        p = torch.zeros_like(p).scatter(-1, order, sp)
        p = p / p.sum(-1, keepdim=True)
    return p


def draw_tokens(probs: torch.Tensor, generators: list[torch.Generator]) -> np.ndarray:
    """One token per row: the inverse CDF of row ``i`` at ``u_i ∈ (0, 1]``, one float64 drawn
    from ``generators[i]`` (a CPU generator), so row ``i``'s draw depends on its own
    distribution and generator only. A token of probability 0 is never drawn.

    Args:
        probs: (B, V) float64 probabilities (:func:`next_token_probs`).
    Returns:
        (B,) int64 token IDs.
    """
    u = torch.stack([1.0 - torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    cdf = probs.cumsum(-1)
    v = (u.to(probs.device) * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, v).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1).cpu().numpy()


def _left_padded(prompts: list[np.ndarray], pad_id: int, device: torch.device):
    """``(input_ids, attention_mask, position_ids)`` of left-padded prompts, each (B, L) int64;
    a row's positions are 0, 1, ... over its real tokens (0 on its padding)."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.from_numpy(p.astype(np.int64))
        mask[i, L - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _forward_kwargs(model) -> tuple[str, dict]:
    """``(name of the KV-cache argument and output, extra keyword arguments)`` of ``model``'s
    forward: transformers ≥ 5.2x calls the cache ``cache`` (``past_key_values`` before);
    ``logits_to_keep=1`` where accepted (only the last position's logits are formed)."""
    import inspect

    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    return ("cache" if "cache" in params else "past_key_values"), extra


@torch.no_grad()
def sample_completions(model, prompts: list[np.ndarray], seeds: list[int], sampling: SamplingConfig,
                       stop_ids: set[int], vocab: int, pad_id: int) -> list[tuple[np.ndarray, str]]:
    """Sample one completion per prompt row, token by token with the model's KV cache.

    Args:
        model: a Hugging Face causal LM in eval mode (its logits may have more than ``vocab``
            columns: only the first ``vocab`` are used).
        prompts: B prompts, each (P_i,) int token IDs (a prompt appears once per completion).
        seeds: B generator seeds (:func:`completion_seed`); unused when ``temperature`` is 0.
        stop_ids: tokens that end a row (kept as its last token).
        vocab: V, the tokenizer's size.
        pad_id: the token placed in padding (masked out, never attended to).
    Returns:
        B pairs ``(completion (N_i,) int32 with 1 <= N_i <= max_new_tokens, finish reason)``,
        the reason ``eos`` when the last token is a stop token, else ``length``.
    """
    device = next(model.parameters()).device
    ids, mask, pos = _left_padded(prompts, pad_id, device)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    cache_arg, extra = _forward_kwargs(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
    tokens: list[list[int]] = [[] for _ in prompts]
    reasons = ["length"] * len(prompts)
    for step in range(sampling.max_new_tokens):
        logits = out.logits[:, -1, :vocab].float()
        if sampling.temperature == 0:
            nxt = logits.argmax(-1).cpu().numpy()
        else:
            nxt = draw_tokens(next_token_probs(logits, sampling.temperature, sampling.top_k, sampling.top_p), gens)
        for i, t in enumerate(nxt.tolist()):
            if reasons[i] == "length" and len(tokens[i]) == step:  # the row is still open
                tokens[i].append(t)
                if t in stop_ids:
                    reasons[i] = "eos"
        if all(r == "eos" for r in reasons) or step + 1 == sampling.max_new_tokens:
            break
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        feed = torch.from_numpy(nxt.astype(np.int64)).to(device)[:, None]  # closed rows: ignored tokens
        out = model(input_ids=feed, attention_mask=mask, position_ids=(lengths + step)[:, None],
                    use_cache=True, **{cache_arg: getattr(out, cache_arg)}, **extra)
    return [(np.asarray(t, dtype=np.int32), r) for t, r in zip(tokens, reasons)]
