"""The one chunk loop behind the fused output-layer losses: the same-tokenizer loss
(:func:`pipeline.student.losses.fused_linear_loss`) and the cross-tokenizer one
(:func:`pipeline.student.cross_tokenizer_loss.cross_tokenizer_loss`) differ only in the terms
they score per chunk of logits.

For the valid positions' final hidden states ``hidden`` (N, H) and the output layer ``W`` (V, H),
``b`` (V,), the driver forms the logits one chunk of positions at a time,
``z = hidden[s:e] @ W.T + b`` (soft-capped to ``c · tanh(z / c)`` when the model caps them),
hands them to the loss's *terms* callback, which returns the chunk's loss sum and
``∂loss/∂z`` (n, V), and forms in the same pass the gradients with respect to ``hidden``, ``W``
and ``b``; the backward pass only multiplies them by the incoming gradient. No ``(N, V)``
tensor exists (the scheme of Liger-Kernel's ``fused_linear_cross_entropy``, in plain PyTorch
so CPUs get it too).

Precision, whatever the compute dtype (bf16 / fp16 under mixed precision):

* float32 (float64 for float64 inputs, as in the tests): the logits and ``∂loss/∂z`` of a chunk,
  the loss sum, the per-position values the terms write, and the weight and bias gradients
  (accumulated over chunks in float32 buffers, multiplied by the incoming gradient in float32,
  then cast to the parameters' dtype). A float16 weight gradient summed over thousands of
  positions exceeds 65504 before the division by the step's token count, which no loss scale
  repairs.
* compute dtype: the three matmuls' inputs. Where the device has a mixed-dtype GEMM
  (``torch.mm(..., out_dtype=torch.float32)``: CUDA) the logits and the weight-gradient product
  run on bf16/fp16 operands with float32 accumulation and output; the hidden-state gradient
  ``dz @ W`` runs in the compute dtype (each row is written once, never summed over chunks).
  Without one (CPUs in torch 2.13) the logits are formed in the compute dtype and converted, and
  the weight-gradient product takes the chunk's float32 ``dz`` and a float32 copy of the chunk's
  hidden states (n × H), never of the weight.

No gradient work (no buffers, no gradient matmuls) when gradients are off (``torch.no_grad``,
evaluation) or no input requires one; only the needed gradients are formed otherwise (a frozen
output layer gets none). One chunk-size rule (:func:`chunk_rows`): from V and a byte budget of
float32 ``(chunk, V)`` temporaries, of which each loss declares how many it keeps alive at once
(the soft-cap's derivative adds one).
"""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.numerics import softcap_

AUTO_CHUNK_BYTES = 128 * 2**20
"""Budget (bytes) of one chunk's float32 ``(chunk, V)`` temporaries when ``chunk_size=0``."""

ChunkTerms = Callable[[torch.Tensor, int, int, bool], "tuple[torch.Tensor, torch.Tensor | None]"]
"""``terms(z, s, e, need_grad) -> (loss_sum, dz)``: scores positions ``s:e`` from their logits
``z`` (e − s, V) (float32; the callback may overwrite them), writes its per-position values into
its own buffers, and returns the chunk's loss sum (scalar) and, when ``need_grad``,
``∂loss_sum/∂z`` (e − s, V) in ``z``'s dtype (it may be ``z``'s own storage), else None."""

_MIXED_GEMM: dict[tuple[str, torch.dtype], bool] = {}


def chunk_rows(vocab_size: int, buffers: int, budget_bytes: int = AUTO_CHUNK_BYTES) -> int:
    """Positions per chunk so that ``buffers`` float32 ``(chunk, V)`` temporaries fit
    ``budget_bytes``; at least 1."""
    return max(1, budget_bytes // (4 * vocab_size * max(1, buffers)))


def _mixed_gemm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs on ``dtype`` (bf16 / fp16)
    operands on this device type (probed once on 2 × 2 tensors; CUDA has the kernel, CPUs in
    torch 2.13 do not)."""
    key = (device.type, dtype)
    if key not in _MIXED_GEMM:
        try:
            a = torch.ones(2, 2, dtype=dtype, device=device)
            out = torch.mm(a, a, out_dtype=torch.float32)
            _MIXED_GEMM[key] = out.dtype == torch.float32 and bool((out == 2).all())
        except (RuntimeError, TypeError):  # no kernel for this backend, or a torch without out_dtype
            _MIXED_GEMM[key] = False
    return _MIXED_GEMM[key]


def _logits(h: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, fdt: torch.dtype, mixed: bool) -> torch.Tensor:
    """(n, V) logits in ``fdt`` of the chunk's hidden states ``h`` (n, H)."""
    if mixed:
        z = torch.mm(h, W.t(), out_dtype=torch.float32)
        return z.add_(b) if b is not None else z
    z = torch.addmm(b, h, W.t()) if b is not None else h @ W.t()
    return z.to(fdt)  # no copy in float32 / float64


def _add_weight_grad(g_w: torch.Tensor, dz: torch.Tensor, dz_c: torch.Tensor, h: torch.Tensor, mixed: bool) -> None:
    """``g_w += dz.T @ h`` into the float32 buffer ``g_w`` (V, H); ``dz_c`` is ``dz`` in the
    compute dtype of ``h``."""
    if h.dtype == g_w.dtype:
        g_w.addmm_(dz.t(), h)
    elif mixed:
        g_w.add_(torch.mm(dz_c.t(), h, out_dtype=torch.float32))
    else:  # no mixed-dtype GEMM: the chunk's float32 dz and hidden states (n×V, n×H), never the weight
        g_w.addmm_(dz.t(), h.to(g_w.dtype))


class _FusedOutputLoss(torch.autograd.Function):
    """Output projection + a loss's chunk terms; gradients formed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, terms, vocab_size, chunk, softcap, needs):
        N = hidden.shape[0]
        W, b = weight[:vocab_size], bias[:vocab_size] if bias is not None else None  # padded rows unused
        fdt = torch.promote_types(hidden.dtype, torch.float32)
        mixed = hidden.dtype != fdt and _mixed_gemm(hidden.device, hidden.dtype)
        need_h, need_w, need_b = needs
        need_grad = any(needs)
        g_hidden = torch.empty_like(hidden) if need_h else None
        g_weight = torch.zeros(weight.shape, dtype=fdt, device=weight.device) if need_w else None
        g_bias = torch.zeros(bias.shape, dtype=fdt, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=fdt, device=hidden.device)
        for s in range(0, N, chunk):
            e = min(N, s + chunk)
            h = hidden[s:e]  # (n, H)
            z = _logits(h, W, b, fdt, mixed)  # (n, V)
            if softcap is not None:
                softcap_(z, softcap)
                if need_grad:  # ∂(c tanh(x/c))/∂x = 1 − tanh²(x/c), from the capped value
                    d_cap = torch.div(z, softcap).square_().neg_().add_(1.0)
            loss_c, dz = terms(z, s, e, need_grad)
            total += loss_c
            if not need_grad:
                continue
            if softcap is not None:
                dz.mul_(d_cap)
                del d_cap
            dz_c = dz.to(hidden.dtype)  # no copy in float32 / float64
            if need_h:
                torch.matmul(dz_c, W, out=g_hidden[s:e])
            if need_w:
                _add_weight_grad(g_weight[:vocab_size], dz, dz_c, h, mixed)
            if need_b:
                g_bias[:vocab_size] += dz.sum(0)
            del dz, dz_c, z
        if need_grad:
            ctx.save_for_backward(g_hidden, g_weight, g_bias)
            ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, g_loss):
        def scale(g, dtype):
            if g is None:
                return None
            if g.dtype in (torch.float16, torch.bfloat16):  # g_loss (1/N × an fp16 loss scale) in float32
                return (g.float() * g_loss.float()).to(dtype)
            return (g * g_loss.to(g.dtype)).to(dtype)

        grads = [scale(g, dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None, None)


def fused_output_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, terms: ChunkTerms, *,
                      vocab_size: int, chunk_size: int = 0, buffers: int = 1,
                      softcap: float | None = None) -> torch.Tensor:
    """``Σ_chunks loss_sum(chunk)`` of the projected hidden states, differentiable with respect to
    ``hidden``, ``weight`` and ``bias`` (module docstring).

    Args:
        hidden: (N, H) final hidden states of the valid positions (float32, bf16 or fp16; float64
            in tests).
        weight: (V_out, H) output projection in ``hidden``'s dtype, ``V_out ≥ vocab_size`` (a
            padded output layer's extra rows are never read and get zero gradient).
        bias: (V_out,) or None.
        terms: the loss's :data:`ChunkTerms` callback.
        vocab_size: V, the rows of ``weight`` scored.
        chunk_size: positions per chunk; 0: :func:`chunk_rows` of V and ``buffers``
            (``AUTO_CHUNK_BYTES``).
        buffers: float32 ``(chunk, V)`` temporaries the terms keep alive at once (the logits
            counted), for the automatic chunk size.
        softcap: ``c`` of the model's logit soft-cap ``c · tanh(z / c)``
            (``final_logit_softcapping``), or None.
    Returns:
        Scalar loss sum, float32 (float64 for float64 inputs); with a gradient function when
        gradients are on and an input requires one.
    """
    on = torch.is_grad_enabled()
    needs = (on and hidden.requires_grad, on and weight.requires_grad,
             on and bias is not None and bias.requires_grad)
    if chunk_size <= 0:
        chunk_size = chunk_rows(vocab_size, buffers + (softcap is not None and any(needs)))
    return _FusedOutputLoss.apply(hidden, weight, bias, terms, int(vocab_size), int(chunk_size), softcap, needs)
