"""Every divergence through the fused, chunked output layer against a dense float64 reference
written from the definitions (values and gradients with respect to hidden states, weight and
bias), on ragged chunks and a padded output layer; parameter and cache-pair refusals."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from pipeline.student.divergences import DIVERGENCES, Divergence
from pipeline.student.losses import fused_linear_loss
from reference_losses import sparse_divergence, sparse_kl
from test_fused_loss import _cache_temperature, _targets, dense_problem

PARAMS = {"beta": 0.3, "skew": 0.2, "akl_mu": 0.5}


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tail,alpha,tau", list(itertools.product(["bucket", "renormalize"], [0.0, 0.5], [1.0, 2.0])))
def test_fused_divergence_equals_dense_values_and_gradients(divergence, tail, alpha, tau):
    hidden, weight, bias, tg, V = dense_problem((divergence, tail, alpha, tau), "topk")
    z = hidden @ weight[:V].t() + bias[:V]
    ce = -F.log_softmax(z, -1).gather(-1, tg.labels[:, None]).squeeze(-1)
    log_qt = F.log_softmax(z / tau, -1)
    t_c = _cache_temperature(tail, tau)
    kl = sparse_kl(log_qt, tg.topk_ids, tg.topk_logprobs, tg.tail_logprob, tau, tail, cache_temperature=t_c)
    if divergence == "forward_kl":  # today's loss (renormalize: the student's q not renormalised)
        d = kl
    else:
        d = sparse_divergence(log_qt, tg.topk_ids, tg.topk_logprobs, tg.tail_logprob, tau, tail, divergence,
                              cache_temperature=t_c, **PARAMS)
    ref_loss = alpha * ce.sum() + (1 - alpha) * tau**2 * d.sum()
    ref_grads = torch.autograd.grad(ref_loss, (hidden, weight, bias))
    per = lambda x: torch.zeros(tg.n_samples, dtype=torch.float64).index_add_(0, tg.sample_index, x.detach())  # noqa: E731
    div = Divergence(divergence, **PARAMS)
    for chunk in (0, 7):  # one chunk, and several with a ragged last chunk
        out = fused_linear_loss(hidden, weight, bias, tg, alpha=alpha, temperature=tau, tail=tail, vocab_size=V,
                                chunk_size=chunk, divergence=div, cache_temperature=t_c)
        grads = torch.autograd.grad(out.loss_sum * 3.0, (hidden, weight, bias))  # an upstream scale
        torch.testing.assert_close(out.loss_sum, ref_loss, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(out.distill_sum.double(), per(d), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(out.kl_sum.double(), per(kl), rtol=1e-6, atol=1e-7)  # kl_sum: forward KL always
        for got, ref in zip(grads, ref_grads):
            torch.testing.assert_close(got, 3.0 * ref, rtol=1e-6, atol=1e-9)
        assert grads[1][V:].abs().max() == 0 and grads[2][V:].abs().max() == 0  # padding rows untouched
    assert (d >= -1e-12).all()  # every one of them is a divergence: nonnegative


def test_forward_kl_is_todays_loss_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    N, H, V, k, S = 50, 8, 40, 6, 5
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    tg = _targets(N, V, k, S, "topk", g)
    tg.topk_logprobs, tg.tail_logprob = tg.topk_logprobs.float(), tg.tail_logprob.float()
    for tail in ("bucket", "renormalize"):
        a = fused_linear_loss(hidden, weight, None, tg, alpha=0.5, temperature=2.0, tail=tail, chunk_size=7,
                              cache_temperature=2.0)
        b = fused_linear_loss(hidden, weight, None, tg, alpha=0.5, temperature=2.0, tail=tail, chunk_size=7,
                              divergence=Divergence("forward_kl"), cache_temperature=2.0)
        assert torch.equal(a.loss_sum, b.loss_sum) and torch.equal(a.kl_sum, b.distill_sum)


def test_divergences_reach_zero_at_the_teacher_and_differ_elsewhere():
    """A student equal to the teacher on the categories scores 0 under every divergence."""
    lp = F.log_softmax(torch.randn(4, 10, dtype=torch.float64), -1)
    vals, ids = lp.topk(4, -1)
    from pipeline.numerics import log1mexp

    tail = log1mexp(torch.logsumexp(vals, -1).clamp(max=0))
    for name in DIVERGENCES:
        d = sparse_divergence(lp, ids, vals, tail, 1.0, "bucket", name)
        torch.testing.assert_close(d, torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)
    other = F.log_softmax(torch.randn(4, 10, dtype=torch.float64), -1)
    values = {n: sparse_divergence(other, ids, vals, tail, 1.0, "bucket", n).sum().item() for n in DIVERGENCES}
    assert len({round(v, 9) for v in values.values()}) == len(DIVERGENCES) and min(values.values()) > 0


@pytest.mark.parametrize("kwargs,key", [({"beta": 0.0}, "loss.beta"), ({"beta": 1.0}, "loss.beta"),
                                        ({"skew": 1.0}, "loss.skew"), ({"skew": -0.1}, "loss.skew"),
                                        ({"akl_mu": 0.0}, "loss.akl_mu"), ({"name": "kl"}, "loss.divergence")])
def test_bad_parameters_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        Divergence(**kwargs)


def test_sampled_targets_keep_forward_kl_only():
    g = torch.Generator().manual_seed(0)
    tg = _targets(20, 30, 5, 3, "sampled", g)
    h, w = torch.randn(20, 4, dtype=torch.float64), torch.randn(30, 4, dtype=torch.float64)
    fused_linear_loss(h, w, None, tg, alpha=0.5, tail="sampled")  # forward KL: fine
    with pytest.raises(ValueError, match="loss.divergence=reverse_kl .*sampled"):
        fused_linear_loss(h, w, None, tg, alpha=0.5, tail="sampled", divergence=Divergence("reverse_kl"))


def test_train_student_with_reverse_kl_writes_distill_rows(assets, caches, tmp_path):
    """The stage end to end with ``loss.divergence=reverse_kl``: loss-log rows carry
    ``distill_sum`` (not the forward KL of ``kl_sum``), ``loss_sum`` is built from it, the
    metrics report it and summary.json names the divergence."""
    import json

    import pyarrow.dataset as pads
    from conftest import run_cli, train_config, write_yaml

    out = tmp_path / "run"
    cfg = write_yaml(tmp_path / "t.yaml", train_config(assets, caches, out, max_steps=4, eval_steps=2))
    res = run_cli(["stages.train_student", "--config", str(cfg), "loss.divergence=reverse_kl"])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"] == {"alpha": 0.5, "temperature": 1.0, "tail": "bucket", "divergence": "reverse_kl"}
    logs = pads.dataset(out / "loss_logs", format="parquet", partitioning="hive").to_table().to_pandas()
    assert (logs["distill_sum"] > 0).all() and not (logs["distill_sum"] - logs["kl_sum"]).abs().lt(1e-6).all()
    assert logs["loss_sum"].to_numpy() == pytest.approx(0.5 * logs["ce_sum"] + 0.5 * logs["distill_sum"], rel=1e-5)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "train/distill_loss" in metrics[0]
    last_eval = [m for m in metrics if "eval/loss" in m][-1]
    ev = logs[(logs["split"] == "eval") & (logs["step"] == 4)]
    assert last_eval["eval/distill_loss"] == pytest.approx(ev["distill_sum"].sum() / ev["n_tokens"].sum(), rel=1e-5)


def test_a_sampled_cache_refuses_other_divergences():
    from pipeline.config import ConfigError, LossConfig, TrainStudentConfig
    from pipeline.student.losses import resolve_tail

    cfg = TrainStudentConfig(output_dir="r", student={"path": "s"}, data={"train_cache": "c"},
                             loss=LossConfig(divergence="jsd"))
    assert resolve_tail(cfg, "topk", 1.0).loss.tail == "bucket"
    for target_type in ("sampled", "topk+sampled"):
        with pytest.raises(ConfigError, match=f"loss.divergence=jsd on a {target_type.replace('+', '.')} cache"):
            resolve_tail(cfg, target_type, 1.0)
    with pytest.raises(ValueError, match="loss.divergence=tvd needs loss.tail bucket or renormalize"):
        LossConfig(divergence="tvd", tail="sampled")
