"""Stage 1's streaming input and fused target extraction: the targets computed chunk by chunk
from the teachers' hidden states equal the reference top-k of the full log-softmax (one
teacher, ensembles in both combine modes, τ ≠ 1, a padded output layer), and windows of
samples are the same at every world size while each rank tokenizes only its own rows."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from test_ensemble import _make_teacher

from pipeline.config import DatasetConfig
from pipeline.data import SampleWindows, load_samples, tokenize_part
from pipeline.models import defer_output_projection, load_teacher, load_tokenizer
from pipeline.teacher.topk import fused_topk_targets, output_head
from reference_targets import ensemble_logprobs, topk_targets


@pytest.fixture(scope="module")
def teachers(assets, tmp_path_factory):
    d = tmp_path_factory.mktemp("fused")
    return [assets["teacher"], _make_teacher(assets, d / "a", seed=1), _make_teacher(assets, d / "b", seed=2, pad=8)]


@pytest.mark.parametrize("members,temperature,combine", [
    ([0], 1.0, "probability"), ([0], 2.0, "probability"), ([1, 2], 1.0, "probability"), ([1, 2], 0.7, "logit_mean")])
def test_fused_targets_equal_the_full_log_softmax(assets, teachers, members, temperature, combine):
    V, k = assets["vocab"], 8
    paths, weights = [teachers[m] for m in members], [3.0, 7.0][: len(members)]
    torch.manual_seed(0)
    ids = torch.randint(0, V, (3, 21))
    lengths = [21, 14, 5]  # right-padded batch: only real positions are computed
    ref_lp = ensemble_logprobs([load_teacher(p) for p in paths], weights, ids, temperature, V, combine)
    ref = topk_targets(ref_lp, ids, k)
    models = [load_teacher(p) for p in paths]
    for m in models:
        defer_output_projection(m)
    hiddens = [m(input_ids=ids).logits.flatten(0, 1) for m in models]
    heads = [output_head(m, V) for m in models]
    rows = torch.cat([i * 21 + torch.arange(n - 1) for i, n in enumerate(lengths)])
    got = fused_topk_targets(hiddens, heads, weights, rows, ids.flatten()[rows + 1], k, temperature, combine,
                             chunk_bytes=4 * V * 7)  # 7 rows per chunk: several chunks and a ragged last one
    want = [t.flatten(0, 1)[torch.cat([i * 20 + torch.arange(n - 1) for i, n in enumerate(lengths)])]
            for t in (ref.topk_ids, ref.topk_logprobs, ref.tail_logprob, ref.target_logprob)]
    assert got[0].dtype == torch.int32 and got[0].shape == (rows.numel(), k)
    assert torch.equal(got[0], want[0])
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=0)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run_ranks(cfg, tok, world_size, window_rows, monkeypatch):
    """Iterate one SampleWindows per simulated rank in threads (a barrier-based all-gather);
    returns per rank (windows or the exception raised, rows each rank tokenized)."""
    import pipeline.data.samples as data_samples  # SampleWindows looks both names up in its own module

    barrier, box = threading.Barrier(world_size), [None] * world_size
    tokenized = {r: [] for r in range(world_size)}
    real = tokenize_part  # the original (not an earlier call's spy)
    local = threading.local()

    def spy(ds, tokenizer, cfg, start=0, fingerprint=None, **kwargs):
        tokenized[local.rank].extend(range(start, start + len(ds)))
        return real(ds, tokenizer, cfg, start, fingerprint, **kwargs)

    monkeypatch.setattr(data_samples, "tokenize_part", spy)
    monkeypatch.setattr(data_samples, "TOKENIZE_ROWS", 2)  # several tokenizer calls per rank and window
    out = [None] * world_size

    def rank_main(r):
        local.rank = r

        def gather(obj):
            box[r] = obj
            barrier.wait()
            got = list(box)
            barrier.wait()
            return got

        try:
            w = SampleWindows(cfg, tok, window_rows, r, world_size, gather)
            out[r] = [(n, [(s.sample_id, s.input_ids.tolist(), s.loss_mask.tolist()) for s in samples]) for n, samples in w]
        except (KeyError, ValueError) as e:
            out[r] = e

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out, tokenized


def test_windows_are_the_same_at_every_world_size_and_ranks_tokenize_their_rows(assets, tmp_path, monkeypatch):
    tok = load_tokenizer(assets["tokenizer"])
    rows = [{"text": "def f(x):\n    return x * %d\n" % i * (1 + i % 4)} for i in range(23)] + [{"text": ""}]
    cfg = DatasetConfig(path=_jsonl(tmp_path / "rows.jsonl", rows), max_length=24, overflow="window")
    whole = load_samples(cfg, tok)[0]
    one, _ = _run_ranks(cfg, tok, 1, 5, monkeypatch)
    assert [s for _, w in one[0] for s in w] == [(s.sample_id, s.input_ids.tolist(), s.loss_mask.tolist()) for s in whole]
    assert [n for n, _ in one[0]] == [5, 5, 5, 5, 4]
    for world in (2, 3):
        got, tokenized = _run_ranks(cfg, tok, world, 5, monkeypatch)
        assert all(g == one[0] for g in got), world
        assert sorted(r for t in tokenized.values() for r in t) == list(range(24))  # each row once, by one rank
        assert all(len(t) <= 24 // world + 5 for t in tokenized.values())


def test_a_bad_row_on_one_rank_stops_every_rank_naming_it(assets, tmp_path, monkeypatch):
    tok = load_tokenizer(assets["tokenizer"])
    rows = [{"id": f"r{i}", "text": "x = %d" % i} for i in range(9)]
    rows[8]["text"] = 8  # in rank 1's part of the second window
    cfg = DatasetConfig(path=_jsonl(tmp_path / "bad.jsonl", rows), id_field="id")
    got, _ = _run_ranks(cfg, tok, 2, 5, monkeypatch)
    for e in got:
        assert isinstance(e, ValueError) and "row 8 (sample_id 'r8')" in str(e), e
    rows[8] = {"id": "r1", "text": "again"}  # a duplicate ID across windows and ranks
    cfg = DatasetConfig(path=_jsonl(tmp_path / "dup.jsonl", rows), id_field="id")
    got, _ = _run_ranks(cfg, tok, 2, 5, monkeypatch)
    for e in got:
        assert isinstance(e, ValueError) and "duplicate sample_id 'r1'" in str(e), e


def test_log_normaliser_shifts_only_rows_that_need_it():
    from pipeline.teacher.topk import _log_normaliser

    torch.manual_seed(0)
    z = torch.randn(5, 1000) * 4
    z[1] += 200.0  # would overflow exp without the shift
    z[3] -= 300.0  # would underflow to log(0)
    want = torch.logsumexp(z, -1)
    got = _log_normaliser(z.clone(), z.amax(-1))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    assert torch.isfinite(got).all()
