"""One definition of the teacher statistics: the loss-log columns (``topk_mass_sum``,
``teacher_entropy_sum``) and ``inspect-cache``'s distributions come from
``pipeline.numerics.position_stats``, checked here against a dense float64 reference and
against each other on a real cache."""
import numpy as np

from pipeline.cache import open_cache
from pipeline.cache.stats import cache_summary
from pipeline.data.batch import collate
from pipeline.numerics import position_stats


def _dense(P=50, V=40, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(P, V)) * 3
    return z - np.log(np.exp(z).sum(-1, keepdims=True))  # (P, V) float64 log-probabilities


def _topk(lp, k):
    order = np.argsort(-lp, axis=-1)[:, :k]
    vals = np.take_along_axis(lp, order, -1)
    with np.errstate(divide="ignore"):  # -inf when nothing is left
        tail = np.log1p(-np.exp(vals).sum(-1).clip(max=1.0))
    return vals.astype(np.float32), tail.astype(np.float32)


def test_full_support_gives_the_exact_entropy_and_unit_mass():
    lp = _dense()
    vals, _ = _topk(lp, lp.shape[1])
    tail = np.full(lp.shape[0], -np.inf, np.float32)
    mass, ent = position_stats(vals, tail)
    exact = -(np.exp(lp) * lp).sum(-1)
    np.testing.assert_allclose(mass, 1.0, atol=0)
    np.testing.assert_allclose(ent, exact, rtol=1e-5)


def test_topk_mass_is_the_stored_mass_and_entropy_the_tail_bucket_lower_bound():
    lp = _dense(seed=1)
    exact = -(np.exp(lp) * lp).sum(-1)
    for k in (1, 3, 10):
        vals, tail = _topk(lp, k)
        mass, ent = position_stats(vals, tail)
        p = np.exp(vals.astype(np.float64))
        np.testing.assert_allclose(mass, p.sum(-1), rtol=1e-5)  # 1 - exp(tail) = Σ exp(v) for topk
        r = 1 - p.sum(-1)
        np.testing.assert_allclose(ent, -(p * np.log(p)).sum(-1) - r * np.log(r), rtol=1e-5)
        assert (ent <= exact + 1e-6).all() and (ent > 0).all()


def test_padding_slots_and_sampled_values():
    """Sampled values (summing to 1, -inf padding) give the plug-in entropy of the estimate and
    the true mass of the drawn ids; no NaN from padding."""
    with np.errstate(divide="ignore"):  # log(0) = -inf: the padding slots
        vals = np.log(np.array([[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]], np.float32))
    tail = np.log(np.array([0.3, 0.9], np.float32))  # the true mass outside the drawn ids
    mass, ent = position_stats(vals, tail)
    np.testing.assert_allclose(mass, [0.7, 0.1], rtol=1e-6)
    np.testing.assert_allclose(ent, [1.5 * np.log(2), 0.0], atol=1e-7)
    assert np.isfinite(ent).all()


def test_loss_log_columns_and_inspect_cache_agree_on_a_cache(caches):
    """Summed over the cache, the loss-log columns (built in collation) equal the sums of
    inspect-cache's per-position arrays."""
    r = open_cache(caches["train"])
    batch = collate([r[i] for i in range(len(r))])
    _, arrays = cache_summary(caches["train"])
    assert arrays["mass"].size == int(batch.n_tokens.sum())
    np.testing.assert_allclose(batch.topk_mass_sum.sum().item(), arrays["mass"].sum(), rtol=1e-9)
    np.testing.assert_allclose(batch.teacher_entropy_sum.sum().item(), arrays["entropy"].sum(), rtol=1e-9)
    assert 0 < arrays["mass"].max() <= 1 + 1e-6
