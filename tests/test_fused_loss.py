"""The fused, chunked output layer + loss against the dense reference (values and gradients)."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from pipeline.data.batch import LossTargets

from pipeline.student.losses import auto_chunk_size, fused_linear_loss
from pipeline.teacher.sampled import sampled_targets
from pipeline.numerics import log1mexp
from reference_losses import sparse_kl


def _targets(N, V, k, S, kind, g):
    lp = F.log_softmax(torch.randn(N, V, generator=g, dtype=torch.float64) * 2, -1)
    if kind == "topk":
        vals, ids = lp.topk(k, -1)
        tail = log1mexp(torch.logsumexp(vals, -1).clamp(max=0))
    else:  # sampled layout: -inf padding slots
        ids, vals, tail = sampled_targets(lp.float(), k, "sampled", num_draws=3, generator=g)
        ids, vals, tail = ids.long(), vals.double(), tail.double()
    labels = torch.randint(0, V, (N,), generator=g)
    sample_index = torch.sort(torch.randint(0, S, (N,), generator=g)).values
    return LossTargets(labels, sample_index, S, ids, vals, tail)


def _cache_temperature(tail: str, tau: float) -> float:
    """The cache temperature of these tests' targets: 1, except for ``bucket``, which is exact
    only at τ = T_c on a partial support (the targets are read as written at τ)."""
    return tau if tail == "bucket" else 1.0


def _dense(hidden, weight, bias, tg, alpha, tau, tail, V):
    """(N, V) logits, float64, autograd: the obviously-correct formula."""
    z = hidden @ weight[:V].t() + (bias[:V] if bias is not None else 0)
    ce = -F.log_softmax(z, -1).gather(-1, tg.labels[:, None]).squeeze(-1)
    if alpha == 1.0:
        return ce.sum(), ce, torch.zeros_like(ce)
    kl = sparse_kl(F.log_softmax(z / tau, -1), tg.topk_ids, tg.topk_logprobs, tg.tail_logprob, tau, tail,
                   cache_temperature=_cache_temperature(tail, tau))
    return alpha * ce.sum() + (1 - alpha) * tau**2 * kl.sum(), ce, kl


CASES = [(tail, kind) for tail, kind in (("bucket", "topk"), ("renormalize", "topk"), ("sampled", "sampled"),
                                         ("renormalize", "sampled"))]



def dense_problem(key: tuple, kind: str):
    """The float64 problem of the dense-reference tests: ``(hidden (37, 8), weight (32, 8) — an
    output layer padded by 3 rows past V = 29 —, bias (32,), targets of k = 5 over 6 samples, V)``,
    seeded by ``key`` (crc32 of its repr: the same draw in every process)."""
    import zlib

    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    N, H, V, pad, k, S = 37, 8, 29, 3, 5, 6
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V + pad, H, generator=g, dtype=torch.float64, requires_grad=True)  # padded output layer
    bias = torch.randn(V + pad, generator=g, dtype=torch.float64, requires_grad=True)
    return hidden, weight, bias, _targets(N, V, k, S, kind, g), V

@pytest.mark.parametrize("tail,kind", CASES)
@pytest.mark.parametrize("alpha,tau", list(itertools.product([0.0, 0.5, 1.0], [1.0, 2.0])))
def test_fused_equals_dense_values_and_gradients(tail, kind, alpha, tau):
    hidden, weight, bias, tg, V = dense_problem((tail, kind, alpha, tau), kind)
    ref_loss, ref_ce, ref_kl = _dense(hidden, weight, bias, tg, alpha, tau, tail, V)
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight, bias))
    for chunk in (0, 7):  # one chunk, and several with a ragged last chunk
        out = fused_linear_loss(hidden, weight, bias, tg, alpha=alpha, temperature=tau, tail=tail, vocab_size=V,
                                chunk_size=chunk, cache_temperature=_cache_temperature(tail, tau))
        grads = torch.autograd.grad(out.loss_sum * 3.0, (hidden, weight, bias))  # an upstream scale
        torch.testing.assert_close(out.loss_sum, ref_loss, rtol=1e-5, atol=1e-8)
        per = lambda x: torch.zeros(tg.n_samples, dtype=torch.float64).index_add_(0, tg.sample_index, x.detach())  # noqa: E731
        torch.testing.assert_close(out.ce_sum.double(), per(ref_ce), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.kl_sum.double(), per(ref_kl), rtol=1e-5, atol=1e-6)
        for got, ref in zip(grads, ref_grads):
            torch.testing.assert_close(got, 3.0 * ref, rtol=1e-5, atol=1e-8)
        assert grads[1][V:].abs().max() == 0 and grads[2][V:].abs().max() == 0  # padding rows untouched
    if alpha < 1:
        z = hidden @ weight[:V].t() + bias[:V]
        agree = torch.zeros(tg.n_samples, dtype=torch.int64).index_add_(0, tg.sample_index,
                                                            (z.argmax(-1) == tg.topk_ids[:, 0]).long())
        assert torch.equal(out.top1_agree, agree)


def test_float32_fused_matches_float64_reference_and_no_vocab_sized_tensor_is_kept():
    g = torch.Generator().manual_seed(0)
    N, H, V, k = 300, 16, 1000, 8
    hidden = torch.randn(N, H, generator=g, requires_grad=True)
    weight = (torch.randn(V, H, generator=g) * 0.3).requires_grad_(True)
    tg = _targets(N, V, k, 4, "topk", g)
    tg.topk_logprobs, tg.tail_logprob = tg.topk_logprobs.float(), tg.tail_logprob.float()
    out = fused_linear_loss(hidden, weight, None, tg, alpha=0.5, temperature=2.0, tail="bucket", chunk_size=64,
                            cache_temperature=2.0)
    # the saved tensors of the graph: gradients of the inputs only, nothing with V columns besides W's
    saved = [t.shape for t in out.loss_sum.grad_fn.saved_tensors if t is not None]
    assert saved == [hidden.shape, weight.shape], saved
    h64, w64 = hidden.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    tg64 = LossTargets(tg.labels, tg.sample_index, 4, tg.topk_ids, tg.topk_logprobs.double(), tg.tail_logprob.double())
    ref, _, _ = _dense(h64, w64, None, tg64, 0.5, 2.0, "bucket", V)
    assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-5)
    out.loss_sum.backward()
    ref.backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_eval_mode_without_grad_and_errors():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(10, 4, generator=g), torch.randn(12, 4, generator=g)
    tg = _targets(10, 12, 3, 2, "topk", g)
    with torch.no_grad():
        out = fused_linear_loss(hidden.double(), weight.double(), None, tg, alpha=0.5)
    ref, _, _ = _dense(hidden.double(), weight.double(), None, tg, 0.5, 1.0, "bucket", 12)
    assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-9)
    with pytest.raises(ValueError, match="teacher targets"):
        fused_linear_loss(hidden, weight, None, LossTargets(tg.labels, tg.sample_index, 2), alpha=0.5)
    with pytest.raises(ValueError, match="exceeds"):
        fused_linear_loss(hidden, weight, None, tg, alpha=1.0, vocab_size=13)
    empty = LossTargets(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 2)
    h = hidden[:0].clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fused_linear_loss(h, w, None, empty, alpha=1.0)
    out.loss_sum.backward()  # an empty micro-batch still back-propagates (FSDP hooks fire)
    assert out.loss_sum.item() == 0 and w.grad.abs().max() == 0
    assert auto_chunk_size(32000, 1.0, 64 * 2**20) == 524 and auto_chunk_size(32000, 2.0, 64 * 2**20) == 262


@pytest.mark.parametrize("tied", [True, False])
def test_trainer_loss_on_a_model_equals_dense_logits_reference(tied):
    """Trainer._loss (deferred output layer + fused loss) on a tiny Llama, tied and untied head,
    equals the dense loss of the unmodified model's (B, T, V) logits in value and in every
    parameter's gradient."""
    import copy

    from helpers import synthetic_records
    from transformers import AutoModelForCausalLM

    from pipeline.data.demo_corpus import llama_config
    from pipeline.config import LossConfig
    from pipeline.data.batch import collate
    from pipeline.student.step import Trainer
    from reference_losses import distill_loss, padded_targets

    V, k = 64, 6
    cfg = llama_config(V, 16, 2, 2, 1, 32)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    dense_model = copy.deepcopy(model)
    recs = synthetic_records(4, V, k, seed=2)
    batch = collate(recs)
    loss_cfg = LossConfig(alpha=0.5, temperature=2.0, tail="bucket")
    sums = Trainer(model, None, None, loss_cfg, None, torch.device("cpu"), cache_temperature=2.0)._loss(batch)
    sums.loss_sum.backward()
    valid, teacher = padded_targets(recs, batch.input_ids.shape[1])
    logits = dense_model(input_ids=batch.input_ids).logits
    ref = distill_loss(logits, batch.input_ids, valid, alpha=0.5, temperature=2.0, tail="bucket", **teacher,
                       cache_temperature=2.0)
    ref.loss_sum.backward()
    assert sums.loss_sum.item() == pytest.approx(ref.loss_sum.item(), rel=1e-5)
    torch.testing.assert_close(sums.ce_sum.double(), ref.ce_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sums.kl_sum.double(), ref.kl_sum, rtol=1e-5, atol=1e-5)
    assert torch.equal(sums.top1_agree, ref.top1_agree)
    for (name, p), q in zip(model.named_parameters(), dense_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert tied == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)
