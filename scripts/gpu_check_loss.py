"""The fused output loss on a device, in its compute dtype, against a float32 reference and
against Liger-Kernel's fused linear cross entropy (used by ``scripts/gpu_check.py``).

For hidden states ``h`` (N, H) and an output layer ``W`` (V, H), both in the compute dtype
(bf16), three things are measured on the device:

* ``kd``: :func:`pipeline.student.losses.fused_linear_loss` with ``alpha`` 0.5, forward KL,
  ``tail: bucket``, k = 64 teacher targets, against the same loss written out densely in float32
  from the same bf16 inputs (``h.float() @ W.float().T``, IEEE float32 matmuls, TF32 off): the
  loss and the gradients with respect to ``h`` and ``W``.
* ``ce``: the same at ``alpha`` 1 (cross entropy only), for ours, for the plain
  ``F.cross_entropy(h @ W.T)`` a user would write (the (N, V) logits in bf16), and for
  ``liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss`` where it imports (Triton,
  CUDA only); each against the float32 reference, with its forward+backward time and peak
  device memory.

The errors are relative: ``|loss − ref| / |ref|`` and ``‖g − g_ref‖ / ‖g_ref‖`` over all
entries. Why :data:`LOSS_TOL` and :data:`GRAD_TOL`: with the inputs already bf16, the fused
loss rounds each chunk's logits to bf16 (the matmul's output dtype, unit roundoff
u = 2⁻⁸ ≈ 3.9e-3 relative) and casts ``∂loss/∂z`` to bf16 before the two gradient matmuls.
A summed loss averages independent roundings, so its relative error is far below u: 1e-3
allows ~u/4. A gradient entry carries about one rounding of ``∂loss/∂z`` (relative u) plus
the bf16 rounding of its own result: 2⁻⁶ ≈ 1.6e-2 is 4 u, the norm-wise bound of a couple of
roundings with room for unlucky accumulation orders. A wrong factor, a missing term or a
float32-vs-bf16 mix-up is off by far more. On CPU the same checks run at small sizes
(``--device cpu``: bf16 matmuls in software).
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

LOSS_TOL = 1e-3
"""Relative error allowed on a summed loss computed from bf16 inputs (module docstring)."""
GRAD_TOL = 2.0**-6
"""Norm-wise relative error allowed on a gradient computed in bf16 (module docstring)."""
K = 64


class ieee_fp32:
    """Context: float32 matmuls in IEEE float32 on CUDA (TF32 off), restored on exit; the
    project allows TF32 once a stage has run (``pipeline.distributed.allow_tf32``). No-op on CPU."""

    def __enter__(self):
        m = torch.backends.cuda.matmul
        self.saved = m.fp32_precision if hasattr(m, "fp32_precision") else m.allow_tf32
        self._set("ieee" if hasattr(m, "fp32_precision") else False)

    def __exit__(self, *exc):
        self._set(self.saved)

    @staticmethod
    def _set(value) -> None:
        m = torch.backends.cuda.matmul
        if hasattr(m, "fp32_precision"):
            m.fp32_precision = value
        else:
            m.allow_tf32 = value


def make_inputs(N: int, H: int, V: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random ``dtype`` hidden states (N, H) and output layer (V, H) with logits of a few nats'
    spread, labels (N,) and a peaked teacher's top-K targets, all drawn from
    ``softmax(1.5 z + noise)`` on ``device`` (the (N, V) teacher logits never visit the host)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(device)
    W = (torch.randn(V, H, generator=g) * (2.0 / H**0.5)).to(device)
    gd = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        zt = (h @ W.T).mul_(1.5).add_(torch.randn(N, V, generator=gd, device=device))  # (N, V) teacher logits
        lp = torch.log_softmax(zt, -1)
        del zt
        vals, ids = lp.topk(min(K, V), -1)  # (N, K), sorted descending
        tail = torch.log1p(-vals.exp().sum(-1).clamp(max=1 - 1e-7))  # (N,) log tail mass
        labels = torch.multinomial(lp.exp_(), 1, generator=gd).squeeze(1)  # (N,) drawn from the teacher
        del lp
    return {"h": h.to(dtype), "W": W.to(dtype), "labels": labels, "ids": ids, "vals": vals, "tail": tail}


def reference(x: dict, alpha: float) -> tuple[float, torch.Tensor, torch.Tensor]:
    """``α Σ CE + (1−α) Σ KL_bucket`` written out densely in float32 from the bf16 inputs, and its
    gradients with respect to ``h`` and ``W`` (float32). KL_bucket = Σ_S p log(p/q) +
    p_tail log(p_tail/q_tail), p the cached top-K (with the tail) and q = softmax(z)."""
    h = x["h"].float().requires_grad_(True)
    W = x["W"].float().requires_grad_(True)
    with ieee_fp32():
        z = h @ W.T  # (N, V)
        log_q = torch.log_softmax(z, -1)
        loss = -log_q.gather(1, x["labels"][:, None]).sum() * alpha
        if alpha < 1:
            log_qS = log_q.gather(1, x["ids"])
            p, p_tail = x["vals"].exp(), x["tail"].exp()
            q_tail = (1 - log_qS.exp().sum(-1)).clamp(min=1e-30)
            kl = (p * (x["vals"] - log_qS)).sum(-1) + p_tail * (x["tail"] - q_tail.log())
            loss = loss + (1 - alpha) * kl.sum()
        loss.backward()
    return float(loss.detach()), h.grad, W.grad


def _ours(x: dict, alpha: float):
    from pipeline.data.batch import LossTargets
    from pipeline.student.losses import fused_linear_loss

    N = x["h"].shape[0]
    t = LossTargets(x["labels"], torch.zeros(N, dtype=torch.int64, device=x["h"].device), 1,
                    x["ids"], x["vals"], x["tail"])
    return lambda h, W: fused_linear_loss(h, W, None, t, alpha=alpha, tail="bucket").loss_sum


def _plain(x: dict):
    return lambda h, W: F.cross_entropy((h @ W.T).float(), x["labels"], reduction="sum")


def _liger(x: dict):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def run(h, W):
        out = fn(W, h, x["labels"])
        return out[0] if isinstance(out, tuple) else out
    return run


def measure(name: str, fn, x: dict, ref: tuple, reps: int) -> dict:
    """Forward+backward of ``fn(h, W)`` ``reps`` times after a warm-up: median time, peak
    device memory above the inputs (CUDA), and the relative errors against ``ref``."""
    dev = x["h"].device
    times = []
    for i in range(reps + 1):
        h, W = x["h"].detach().requires_grad_(True), x["W"].detach().requires_grad_(True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        t0 = time.perf_counter()
        loss = fn(h, W)
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i:  # the first call warms up (kernels, autotuning)
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else None
    ref_loss, ref_gh, ref_gw = ref
    rel = lambda g, r: float((g.float() - r).norm() / r.norm())  # noqa: E731
    value = float(loss.detach())
    return {"impl": name, "loss": value, "loss_rel_err": abs(value - ref_loss) / abs(ref_loss),
            "grad_h_rel_err": rel(h.grad, ref_gh), "grad_w_rel_err": rel(W.grad, ref_gw),
            "ms": 1e3 * statistics.median(times), "peak_mib": peak}


def run(device: torch.device, N: int, H: int, vocabs: list[int], reps: int = 3) -> list[dict]:
    """Every measurement at every V: one dict each (``case`` kd or ce, ``impl`` ours / plain /
    liger, errors, ms, peak MiB; ``skipped`` with the reason where Liger does not import)."""
    try:
        import liger_kernel.transformers  # noqa: F401

        liger = None if device.type == "cuda" else "liger-kernel runs on CUDA only (Triton)"
    except Exception as e:  # noqa: BLE001 — any import failure (no package, no Triton) is a skip
        liger = f"liger-kernel does not import ({type(e).__name__}: {e})"[:160]
    out = []
    for V in vocabs:
        x = make_inputs(N, H, V, device, torch.bfloat16)
        for case, alpha in (("kd", 0.5), ("ce", 1.0)):
            ref = reference(x, alpha)
            impls = [("ours", _ours(x, alpha))]
            if case == "ce":
                impls.append(("plain", _plain(x)))
                if liger is None:
                    impls.append(("liger", _liger(x)))
            for name, fn in impls:
                try:
                    out.append({"case": case, "vocab": V, "N": N, "H": H, **measure(name, fn, x, ref, reps)})
                except Exception as e:  # noqa: BLE001 — Liger's own failure is reported, not ours
                    if name != "liger":
                        raise
                    out.append({"case": case, "vocab": V, "N": N, "H": H, "impl": name,
                                "skipped": f"liger-kernel failed: {type(e).__name__}: {e}"[:160]})
            if case == "ce" and liger is not None:
                out.append({"case": case, "vocab": V, "N": N, "H": H, "impl": "liger", "skipped": liger})
            del ref
        del x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out
