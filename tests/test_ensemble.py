"""Teacher ensembles in stage 1: the stored top-k is the top-k of the hand-computed mixture,
a one-teacher ensemble is the plain path bit for bit, padded output layers are sliced to the
tokenizer, mismatched tokenizers are refused, and 2 ranks equal 1 rank bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import precompute_config, run_cli, write_yaml

from pipeline.cache import open_cache, read_manifest

FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logprob")


def _make_teacher(assets: dict, out, seed: int, pad: int = 0, spread: float = 8.0):
    """A tiny random Llama with the fixture tokenizer; ``pad`` extra output rows beyond the
    tokenizer (a padded embedding); the final norm scaled by ``spread`` so that the
    distributions are far from uniform (distinct top-k, mixture ≠ geometric mean)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.data.demo_corpus import llama_config

    tok = AutoTokenizer.from_pretrained(assets["tokenizer"])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config(len(tok) + pad, 32, 2, 4, 2, 64, bos_token_id=tok.bos_token_id,
                                                          eos_token_id=tok.eos_token_id))
    with torch.no_grad():
        model.model.norm.weight.mul_(spread)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _precompute(cfg_dict: dict):
    """Stage 1 in this process (one-rank gloo group), returning the manifest."""
    from pipeline.config import PrecomputeConfig
    from pipeline.distributed import init_distributed, teardown
    from pipeline.teacher.precompute import precompute

    cfg = PrecomputeConfig.model_validate(cfg_dict)
    info = init_distributed("cpu")
    try:
        return precompute(cfg, info).manifest
    finally:
        teardown()


@pytest.fixture(scope="module")
def pair(assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("ensemble")
    a = _make_teacher(assets, d / "a", seed=1)
    b = _make_teacher(assets, d / "b", seed=2, pad=8)  # padded output layer: V + 8 logits
    return {"dir": d, "a": a, "b": b}


def _ensemble_cfg(assets, pair, cache_dir, combine="probability", **over):
    cfg = precompute_config(assets, cache_dir, **{"dataset.num_samples": 12, "cache.value_dtype": "float32", **over})
    cfg["teachers"] = [{"path": pair["a"], "weight": 3.0}, {"path": pair["b"], "weight": 7.0}]
    cfg["combine"] = combine
    return cfg


def _reference(pair, input_ids: np.ndarray, V: int, combine: str) -> np.ndarray:
    """Hand-computed (T, V) float64 log-probabilities of the 0.3/0.7 ensemble for one sample."""
    from transformers import AutoModelForCausalLM

    ids = torch.as_tensor(input_ids, dtype=torch.long)[None]
    lps = []
    for name in ("a", "b"):
        model = AutoModelForCausalLM.from_pretrained(pair[name]).double().eval()
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :, :V]  # slice the padded rows of teacher b
        lps.append(F.log_softmax(logits, dim=-1))
    if combine == "probability":
        mix = torch.logsumexp(torch.stack([np.log(0.3) + lps[0], np.log(0.7) + lps[1]]), dim=0)
    else:
        mix = F.log_softmax(0.3 * lps[0] + 0.7 * lps[1], dim=-1)
    return mix.numpy()


@pytest.mark.parametrize("combine", ["probability", "logit_mean"])
def test_ensemble_stores_topk_of_hand_computed_mixture(assets, pair, tmp_path, combine):
    m = _precompute(_ensemble_cfg(assets, pair, tmp_path / "c", combine))
    V = assets["vocab"]
    assert m.vocab_size == V and m.combine == combine
    assert [t.weight for t in m.teachers] == pytest.approx([0.3, 0.7])
    assert all(t.fingerprint for t in m.teachers)
    cache = open_cache(tmp_path / "c")
    k = m.k
    for sid in cache.sample_ids:
        rec = cache[cache.index_of(sid)]
        ref = _reference(pair, rec.input_ids, V, combine)[:-1]  # (T-1, V)
        ids = rec.topk_ids.astype(np.int64)
        assert ids.max() < V
        # the stored values are the mixture at the stored ids ...
        np.testing.assert_allclose(rec.topk_logprobs, np.take_along_axis(ref, ids, -1), atol=2e-5, rtol=0)
        # ... and the stored ids are a top-k of the mixture (exact up to float32 ties)
        kth = np.sort(ref, -1)[:, -k]
        assert (np.take_along_axis(ref, ids, -1) >= kth[:, None] - 2e-5).all(), sid
        assert all(len(set(row)) == k for row in ids.tolist())
        rest = ref.copy()
        np.put_along_axis(rest, ids, -np.inf, -1)
        tail = np.logaddexp.reduce(rest, -1)  # exact log-mass outside the stored ids
        np.testing.assert_allclose(np.exp(rec.tail_logprob), np.exp(tail), atol=2e-6, rtol=0)


def test_single_teacher_ensemble_equals_plain_path(assets, caches, tmp_path):
    from reference_targets import ensemble_logprobs
    from pipeline.models import load_teacher

    teacher = load_teacher(assets["teacher"])
    ids = torch.randint(0, assets["vocab"], (3, 17))
    plain = F.log_softmax(teacher(input_ids=ids).logits.float() / 2.0, dim=-1)
    for combine in ("probability", "logit_mean"):
        assert torch.equal(ensemble_logprobs([teacher], [0.4], ids, 2.0, assets["vocab"], combine), plain)
    # the whole stage: a weighted one-teacher "ensemble" writes the fixture cache bit for bit
    cfg = precompute_config(assets, tmp_path / "one")
    cfg["teachers"] = [{"path": assets["teacher"], "weight": 0.4}]
    m = _precompute(cfg)
    assert m.teachers[0].weight == 1.0 and m.header() == read_manifest(caches["train"]).header()
    a, b = open_cache(caches["train"]), open_cache(tmp_path / "one")
    assert sorted(a.sample_ids) == sorted(b.sample_ids)
    for sid in a.sample_ids:
        ra, rb = a[a.index_of(sid)], b[b.index_of(sid)]
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(ra, f), getattr(rb, f), err_msg=f"{sid} {f}")


def test_mismatched_tokenizers_are_refused(assets, pair, tmp_path):
    from pipeline.data.demo_corpus import train_tokenizer

    other = tmp_path / "other"
    _make_teacher(assets, other, seed=3)
    # same vocabulary size, different merges: only the fingerprint tells them apart
    train_tokenizer(["zzz yyy xxx www " * 50, "qqq ppp " * 80], assets["vocab"], other)
    cfg = _ensemble_cfg(assets, pair, tmp_path / "c")
    cfg["teachers"][1]["path"] = str(other)
    with pytest.raises(ValueError, match=f"teacher {other} has a different tokenizer.*fingerprint"):
        _precompute(cfg)
    bare = tmp_path / "bare"
    _make_teacher(assets, bare, seed=4)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    (bare / "special_tokens_map.json").unlink(missing_ok=True)
    cfg["teachers"][1]["path"] = str(bare)
    with pytest.raises(ValueError, match=f"teacher {bare} has no tokenizer files"):
        _precompute(cfg)
    small = tmp_path / "small"
    _make_teacher(assets, small, seed=5, pad=-4)  # fewer logits than tokens
    cfg["teachers"][1]["path"] = str(small)
    with pytest.raises(ValueError, match=f"{assets['vocab'] - 4} output logits"):
        _precompute(cfg)


def test_two_rank_ensemble_equals_one_rank(assets, pair, tmp_path):
    cfg = _ensemble_cfg(assets, pair, tmp_path / "c1", **{"dataset.num_samples": 20})
    _precompute(cfg)
    cfg["cache"]["dir"] = str(tmp_path / "c2")
    res = run_cli(["stages.precompute_teacher", "--config", str(write_yaml(tmp_path / "p.yaml", cfg))], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "global" in res.stdout and "rank 1:" in res.stdout
    one, two = open_cache(tmp_path / "c1"), open_cache(tmp_path / "c2")
    assert {s.rank for s in two.shards} == {0, 1}
    assert sorted(one.sample_ids) == sorted(two.sample_ids)
    for sid in one.sample_ids:
        a, b = one[one.index_of(sid)], two[two.index_of(sid)]
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f"{sid} {f}")
