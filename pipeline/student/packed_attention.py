"""Attention confined to each packed sample (``data.packing``).

A packed row holds several samples back to back (``pipeline.student.sampler.collate``). Hugging Face's
own handling of packed rows (position ids that restart per sample → a block-diagonal mask
for SDPA/eager) computes the full ``L × L`` scores of every row and, with a mask, cannot use
the causal kernels' skipping: on small models it is slower than not packing. So for the SDPA
and eager implementations the student's attention is switched to :func:`segment_sdpa_attention`,
which runs one causal ``scaled_dot_product_attention`` per sample (cost ``Σ n_i²/2`` instead of
``R · L²``), with the segment boundaries computed by the loader on the host (no device
synchronisation). Flash-attention implementations get the position ids and use their own
varlen path (``cu_seqlens`` derived from them by transformers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

PACKED_ATTENTION = "kd_segment_sdpa"
"""Name under which :func:`segment_sdpa_attention` is registered with transformers."""


def segment_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """Causal SDPA per packed sample; a transformers attention function.

    Args:
        query: (R, H, L, D); key, value: (R, H_kv, L, D) (grouped-query heads are repeated).
        kwargs: ``kd_segments``: per row, the ``(start, end)`` token ranges of its samples and
            of its trailing padding, covering ``[0, L)``. Without it (unpacked batches,
            evaluation, generation) the call is transformers' own ``sdpa_attention_forward``.
    Returns:
        ((R, L, H, D) attention output, None).
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    segments = kwargs.pop("kd_segments", None)
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key, value = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    p = dropout if module.training else 0.0
    rows = []
    for r, segs in enumerate(segments):
        q, k, v = query[r:r + 1], key[r:r + 1], value[r:r + 1]
        rows.append(torch.cat([F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], dropout_p=p,
                                                              is_causal=True, scale=scaling) for s, e in segs], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def enable_packed_attention(model: nn.Module) -> str:
    """Prepare a Hugging Face causal LM for packed rows; returns how to call it.

    Returns:
        ``"segments"``: SDPA/eager models are switched to :func:`segment_sdpa_attention`
        (unpacked calls behave exactly as before); call with ``position_ids``, an all-ones
        ``attention_mask`` and ``kd_segments``. ``"position_ids"``: other implementations
        (flash attention's varlen path): call with ``position_ids`` only.
    """
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == PACKED_ATTENTION:
        return "segments"
    if impl not in ("sdpa", "eager"):
        return "position_ids"
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(PACKED_ATTENTION, segment_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    model.set_attn_implementation(PACKED_ATTENTION)
    return "segments"
