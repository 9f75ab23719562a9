"""The chunk driver both fused losses share (pipeline/student/fused_driver.py): bf16/fp16 inputs
give finite gradients close to the float64 computation on an ordinary batch whose raw weight
gradient exceeds float16's range; evaluation under no_grad does no gradient work; the soft-cap's
chain rule; and the cap on consecutive fp16 overflow-skipped steps stops a run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import train_config, write_yaml
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.data.batch import LossTargets
from pipeline.numerics import log1mexp
from pipeline.student.cross_tokenizer_loss import cross_tokenizer_loss
from pipeline.student.losses import fused_linear_loss

FP16_MAX = torch.finfo(torch.float16).max  # 65504


def _batch(N: int, H: int, V: int, k: int = 8, outlier: float = 0.0, seed: int = 0):
    """Hidden states (N, H), an output layer (V, H) and same-/cross-tokenizer targets (teacher
    top-k of a random distribution; 80 % of positions aligned, 60 % of ids mapped). ``outlier``:
    the mean of hidden channel 0, a "massive activation" of the kind trained LMs carry into their
    final hidden states (Sun et al., "Massive Activations in Large Language Models", 2024)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    hidden[:, 0] += outlier
    weight = torch.randn(V, H, generator=g) * 0.05
    weight[:, 0] *= 0.2
    weight[0, 0] = 0.12  # token 0 alone leans on that channel: the student over-predicts it everywhere
    vals, ids = F.log_softmax(torch.randn(N, V, generator=g) * 2, -1).topk(k, -1)
    tail = log1mexp(torch.logsumexp(vals, -1))
    aligned, mapped = torch.rand(N, generator=g) < 0.8, torch.rand(N, k, generator=g) < 0.6
    labels = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, LossTargets(labels, torch.arange(N) * 8 // N, 8, ids, vals, tail, aligned, mapped)


LOSSES = {
    "same": lambda h, w, b, t, **kw: fused_linear_loss(h, w, b, t, alpha=0.5, tail="bucket", **kw),
    "cross": lambda h, w, b, t, **kw: cross_tokenizer_loss(h, w, b, t, alpha=0.5, mode="gold", **kw),
}


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_low_precision_gradients_are_finite_and_close_to_float64(loss):
    """8 × 1024 positions with an outlier hidden channel: the weight gradient summed over the
    positions (before the division by N) exceeds 65504, so a float16 copy of it is inf — what the
    cross-tokenizer loss saved before sharing the driver. Through the driver, fp16 and bf16
    inputs give finite gradients within 1 % (weight) and 3 % (hidden states) of the float64
    computation on the same rounded inputs, and the loss within 1e-4."""
    fn = LOSSES[loss]
    hidden, weight, t = _batch(8192, 64, 512, outlier=48.0)
    N = hidden.shape[0]
    for dtype in (torch.float16, torch.bfloat16):
        h, w = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
        h64, w64 = hidden.to(dtype).double().requires_grad_(), weight.to(dtype).double().requires_grad_()
        got, ref = fn(h, w, None, t), fn(h64, w64, None, t)
        (got.loss_sum / N).backward()
        (ref.loss_sum / N).backward()
        raw = w64.grad * N  # Σ over positions, as the forward pass forms it
        assert raw.abs().max() > FP16_MAX and torch.isinf(raw.half()).any()  # the old float16 copy overflowed
        assert got.loss_sum.dtype == torch.float32
        assert w.grad.dtype == dtype and h.grad.dtype == dtype
        assert torch.isfinite(w.grad).all() and torch.isfinite(h.grad).all()
        rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
        assert rel(w.grad, w64.grad) < 1e-2, (dtype, rel(w.grad, w64.grad))
        assert rel(h.grad, h64.grad) < 3e-2, (dtype, rel(h.grad, h64.grad))
        assert got.loss_sum.item() == pytest.approx(ref.loss_sum.item(), rel=1e-4)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns, and the matmuls run."""

    def __init__(self):
        super().__init__()
        self.shapes, self.matmuls = set(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.matmuls += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
        if func.is_view:  # slices of the inputs share their storage: not an allocation
            return out
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.shapes.add(tuple(o.shape))
        return out


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_no_gradient_work_without_gradients(loss):
    """Under no_grad (evaluation), with parameters that require grad, neither gradient buffer —
    the weight's (V_out, H) nor the hidden states' (N, H) — is allocated and only the logits'
    matmuls run (one per chunk); with gradients on, all three of each chunk run. A frozen output
    layer gets no weight-gradient buffer, and the hidden states' gradient is unchanged."""
    fn = LOSSES[loss]
    hidden, weight, t = _batch(40, 8, 30, k=4)
    h, w, b = hidden.requires_grad_(), weight.requires_grad_(), torch.zeros(30, requires_grad=True)
    with torch.no_grad(), _Shapes() as spy:
        off = fn(h, w, b, t, chunk_size=16)
    assert (30, 8) not in spy.shapes and (40, 8) not in spy.shapes, spy.shapes
    assert spy.matmuls == 3 and off.loss_sum.grad_fn is None
    with _Shapes() as spy:
        on = fn(h, w, b, t, chunk_size=16)
    assert (30, 8) in spy.shapes and (40, 8) in spy.shapes and spy.matmuls == 9  # the spy sees the buffers
    assert on.loss_sum.item() == pytest.approx(off.loss_sum.item(), rel=1e-6)
    g_h = torch.autograd.grad(on.loss_sum, h)[0]
    frozen = w.detach()
    with _Shapes() as spy:
        out = fn(h, frozen, b.detach(), t, chunk_size=16)
    assert (30, 8) not in spy.shapes and spy.matmuls == 6
    torch.testing.assert_close(torch.autograd.grad(out.loss_sum, h)[0], g_h)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_softcap_follows_the_chain_rule(loss, tau):
    """``softcap=c`` equals the loss of the explicitly capped logits ``c · tanh(z / c)`` formed
    by autograd ops and fed through an identity output layer (values; gradients with respect to
    the hidden states, the weight and the bias), float64; the cap changes the loss."""
    hidden, weight, t = _batch(37, 8, 29, k=5, seed=3)
    h, w = hidden.double().requires_grad_(), (weight.double() * 40).requires_grad_()  # logits of ±10: the cap bites
    b = torch.randn(29, dtype=torch.float64).requires_grad_()
    kw = dict(temperature=tau, cache_temperature=tau)  # the targets read as written at τ (exact at τ = T_c)
    fn = LOSSES[loss]
    got = fn(h, w, b, t, softcap=5.0, chunk_size=7, **kw)
    g_got = torch.autograd.grad(got.loss_sum, (h, w, b))
    z = h @ w.t() + b
    capped = 5.0 * torch.tanh(z / 5.0)
    ref = fn(capped, torch.eye(29, dtype=torch.float64), None, t, **kw)
    g_ref = torch.autograd.grad(ref.loss_sum, (h, w, b))
    torch.testing.assert_close(got.loss_sum, ref.loss_sum, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.ce_sum, ref.ce_sum, rtol=1e-6, atol=1e-6)
    for a, r in zip(g_got, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)
    uncapped = fn(z.detach(), torch.eye(29, dtype=torch.float64), None, t, **kw)
    assert abs(uncapped.loss_sum.item() - ref.loss_sum.item()) > 0.05 * abs(ref.loss_sum.item())


def test_consecutive_fp16_overflows_stop_the_run(assets, caches, tmp_path, capfd):
    """fp16 training with overflows forced at steps 1, 2 and 4–6 and max_consecutive_overflows 3:
    step 3 breaks the first run of overflows, the third in a row (step 6) stops train-student with
    one line naming the key and exit status 2; no checkpoint or final/ after it."""
    from stages.train_student import main as train

    run = tmp_path / "run"
    hook = {"target": "tests.precision_hooks:ForceOverflow", "at_step": [1, 2, 4, 5, 6], "log": str(tmp_path / "hook")}
    cfg = train_config(assets, caches, run, max_steps=10, eval_steps=100, save_steps=3, mixed_precision="fp16",
                       max_consecutive_overflows=3, callbacks=[hook])
    capfd.readouterr()
    code = train(["--config", str(write_yaml(tmp_path / "c.yaml", cfg))])
    out, err = capfd.readouterr()
    assert code == 2, err[-2000:]
    assert err.count("\n") == 1 and "max_consecutive_overflows=3" in err, err
    assert "3 consecutive steps (4 to 6" in err, err
    assert "overflow at step 2" in out and "overflow at step 3" not in out and "overflow at step 6" in out
    ckpts = run / "checkpoints"
    assert (ckpts / "step-00000003").is_dir() and not (ckpts / "step-00000006").exists()
    assert not (run / "final").exists()
