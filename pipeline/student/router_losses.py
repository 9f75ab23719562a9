"""Mixture-of-experts router losses from the per-layer router logits (``loss.router``).

Hugging Face MoE models (Mixtral, Qwen2-MoE, OLMoE, ...) called with
``output_router_logits=True`` return ``router_logits``: a tuple with one ``(R*L, E)`` tensor
per MoE layer (R rows of L tokens flattened row-major, E experts), the logits of a softmax
router before its top-k selection. Each loss below is computed per layer over the micro-batch's
**valid positions** only (``Batch.rows``: padding never enters a mean) and **summed over the
layers** (Switch Transformer and ST-MoE add one such term per router layer). With k experts per
token, p = softmax(router logits) (n, E), ``P_e`` = mean over the n positions of ``p[:, e]``:

* ``load_balance`` (Fedus et al. 2021, "Switch Transformers", eq. 4, generalised to top-k as
  transformers' ``load_balancing_loss_func`` for Mixtral): ``E · Σ_e f_e · P_e`` with ``f_e``
  the fraction of positions that have e among their top-k experts (``Σ_e f_e = k``; f carries no
  gradient, P does). Perfectly balanced routing gives k per layer (1 at k = 1, Switch's value).
  transformers pools the layers before the product (one term for all layers); here each layer
  is balanced on its own and the terms are summed, so one layer's imbalance cannot hide behind
  another's.
* ``z_loss`` (Zoph et al. 2022, "ST-MoE", eq. 5): ``mean_positions logsumexp(logits)²``; keeps
  the router logits small, so the router's softmax stays stable in low precision.
* ``auxiliary``: ``E · Σ_e (P_e − 1/E)²``, the deviation of the mean router distribution from
  uniform. It equals the squared coefficient of variation of the experts' importance
  (``Importance_e = Σ_positions p_e``, population variance) — the importance loss of Shazeer et
  al. 2017 ("Outrageously Large Neural Networks", eq. 6), computed on the full softmax rather
  than the top-k gates. 0 iff every expert receives the same mean probability; unlike
  ``load_balance`` it is smooth (no top-k counts) but blind to the hard top-k assignment.
"""
from __future__ import annotations

import torch

ROUTER_TERMS = ("load_balance", "z_loss", "auxiliary")
"""Names of the router loss terms, in the order of ``LossConfig.router``'s ``*_coef`` fields and
the logged metrics ``{split}/router_{name}``."""

_TOP_K_ATTRS = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts")


def router_top_k(config) -> int | None:
    """Experts per token of a Hugging Face MoE config (``num_experts_per_tok`` for Mixtral /
    Qwen2-MoE / OLMoE / DeepSeek, or another common name), None when it names none."""
    for name in _TOP_K_ATTRS:
        k = getattr(config, name, None)
        if isinstance(k, int) and k > 0:
            return k
    return None


def router_losses(router_logits: tuple[torch.Tensor, ...] | list[torch.Tensor], rows: torch.Tensor,
                  top_k: int | None, n_positions: int) -> dict[str, torch.Tensor]:
    """The router loss terms of one forward, summed over layers (formulas: module docstring).

    Args:
        router_logits: one ``(R*L, E)`` tensor per MoE layer, any float dtype (computed in float32).
        rows: (n,) int64 flat indices ``r * L + t`` of the valid positions (``Batch.rows``).
        top_k: experts per token; None skips ``load_balance`` (the model's config names no k).
        n_positions: R*L, the size of the batch's token grid (``input_ids.numel()``).
    Returns:
        ``{name: scalar float32}`` for the names of :data:`ROUTER_TERMS` (``load_balance`` only
        with ``top_k``), differentiable with respect to the logits; zeros when ``n == 0``.
    Raises:
        ValueError: no router logits, or a layer whose row count is not that of the batch's
            token grid (the valid positions could not be picked out).
    """
    if not router_logits:
        raise ValueError("the model returned no router_logits")
    names = [n for n in ROUTER_TERMS if top_k is not None or n != "load_balance"]
    first = router_logits[0]
    out = {n: first.new_zeros((), dtype=torch.float32) for n in names}
    if rows.numel() == 0:  # a padding micro-batch: no position, no mean (0 · n_valid = 0 either way)
        return out
    n = rows.numel()
    for layer, logits in enumerate(router_logits):
        if logits.dim() != 2 or logits.shape[0] != n_positions:  # checked on the host: no device sync
            raise ValueError(f"router_logits[{layer}] has shape {tuple(logits.shape)}: expected "
                             f"({n_positions}, experts), one row per position of the batch's (rows, length) token grid")
        x = logits.index_select(0, rows).float()  # (n, E) valid positions only
        E = x.shape[-1]
        p = torch.softmax(x, dim=-1)  # (n, E)
        P = p.mean(0)  # (E,) mean router probability
        if top_k is not None:
            chosen = torch.topk(p.detach(), min(top_k, E), dim=-1).indices.reshape(-1)  # (n*k,)
            f = torch.zeros(E, dtype=torch.float32, device=x.device).index_add_(
                0, chosen, torch.ones_like(chosen, dtype=torch.float32)) / n  # (E,), Σ f = k
            out["load_balance"] = out["load_balance"] + E * (f * P).sum()
        out["z_loss"] = out["z_loss"] + torch.logsumexp(x, dim=-1).square().mean()
        out["auxiliary"] = out["auxiliary"] + E * (P - 1.0 / E).square().sum()
    return out
