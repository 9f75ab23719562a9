"""Sample-ID bookkeeping in bounded memory: the sorted 64-bit hash index, duplicate detection
in stage 1's windows (within a window, across windows), resume and the cache reader's ID
lookup over closed shards, each still exact when every hash collides (the hash monkeypatched),
and stage 2's streamed dataset source giving the same samples and batches as the whole-dataset
load."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import synthetic_records

import pipeline.cache.shard_ids as shard_ids_mod
import pipeline.cache.shards as shards_mod
import pipeline.cache.writer as writer_mod
import pipeline.data.samples as samples_mod
import pipeline.data.stream as stream_mod
from pipeline.cache import Manifest, finalize_cache, open_cache, open_writer, prepare_cache
from pipeline.cache.manifest import TeacherEntry
from pipeline.config import DatasetConfig
from pipeline.data import DatasetSamples, SampleWindows, load_samples
from pipeline.sample_ids import HashIndex, id_hash, id_hashes, repeated_hashes
from pipeline.models import load_tokenizer
from pipeline.student.sampler import StepPrefetcher, StepSampler

V, K = 50, 4


def colliding_hashes(ids):
    """A 'hash' with 3 values: nearly every pair of IDs collides."""
    return np.array([len(s) % 3 for s in ids], dtype=np.uint64)


def collide_hashes(monkeypatch):
    """Make every module that hashes sample IDs use :func:`colliding_hashes`."""
    for mod in (shard_ids_mod, shards_mod, writer_mod, samples_mod, stream_mod):
        monkeypatch.setattr(mod, "id_hashes", colliding_hashes)


def test_hash_is_stable_and_index_finds_every_copy():
    # pinned: shards store these hashes, so they must never change (BLAKE2b-64, little-endian)
    assert id_hash("sample-0") == int(id_hashes(["sample-0"])[0]) == 0x4d9a0f0789e2fec3
    assert id_hashes(["x", "y"]).dtype == np.uint64 and id_hash("x") != id_hash("y")
    ix = HashIndex()
    rng = np.random.default_rng(0)
    h = rng.integers(0, 50, 1000).astype(np.uint64)  # many repeats
    for a in range(0, 1000, 37):  # uneven batches: several merges
        ix.add(h[a:a + 37], np.arange(a, min(a + 37, 1000)))
    assert len(ix) == 1000 and ix.nbytes == 1000 * 16
    pos, loc = ix.candidates(np.array([7, 99], dtype=np.uint64))
    assert sorted(loc[pos == 0].tolist()) == np.flatnonzero(h == 7).tolist() and not (pos == 1).any()
    groups = sorted(sorted(g.tolist()) for g in ix.repeated())
    assert groups == sorted(np.flatnonzero(h == v).tolist() for v in np.unique(h) if (h == v).sum() > 1)
    assert sorted(repeated_hashes(np.array([5, 1, 5, 2, 1], dtype=np.uint64)).tolist()) == [0, 1, 2, 4]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _windows(cfg, tok, window_rows=4):
    return [s.sample_id for _, w in SampleWindows(cfg, tok, window_rows) for s in w]


@pytest.mark.parametrize("colliding", [False, True])
def test_window_duplicates_within_and_across_windows(assets, tmp_path, monkeypatch, colliding):
    if colliding:
        collide_hashes(monkeypatch)
    tok = load_tokenizer(assets["tokenizer"])
    rows = [{"id": f"r{i}", "text": f"x = {i}"} for i in range(11)]
    cfg = DatasetConfig(path=_jsonl(tmp_path / "ok.jsonl", rows), id_field="id")
    assert _windows(cfg, tok) == [f"r{i}" for i in range(11)]  # no false duplicate, even when all hashes collide
    for where, dup in (("within", 2), ("across", 9)):
        bad = [dict(r) for r in rows]
        bad[dup]["id"] = "r1"
        path = _jsonl(tmp_path / f"{where}.jsonl", bad)
        with pytest.raises(ValueError, match=rf"dataset {path}: duplicate sample_id 'r1'"):
            _windows(DatasetConfig(path=path, id_field="id"), tok)


def _manifest(backend):
    return Manifest(backend=backend, k=K, index_dtype="uint16", value_dtype="float32", vocab_size=V, temperature=1.0,
                    tokenizer_fingerprint="tok", teachers=[TeacherEntry(path="/t", weight=1.0, fingerprint="f")],
                    dataset={}, dataset_fingerprint="ds", max_length=32)


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
@pytest.mark.parametrize("colliding", [False, True])
def test_resume_and_reader_lookups_are_exact(tmp_path, monkeypatch, backend, colliding):
    if colliding:
        collide_hashes(monkeypatch)
    recs = synthetic_records(13, V, K, seed=3)
    m = _manifest(backend)
    state = prepare_cache(tmp_path, m)
    w = open_writer(tmp_path, m, 0, state.attempt, 4, 2)
    w.write(recs[:9])  # 2 closed shards + 1 open one, then a "crash"
    w.close()
    state = prepare_cache(tmp_path, m)  # resume
    found = state.done.find([r.sample_id for r in recs])
    assert (found >= 0).tolist() == [True] * 9 + [False] * 4
    assert [state.done.id_at(int(i)) for i in found[:9]] == [r.sample_id for r in recs[:9]]
    w = open_writer(tmp_path, m, 0, state.attempt, 4, 2)
    w.write(recs[9:])
    w.close()
    finalize_cache(tmp_path)
    r = open_cache(tmp_path)
    assert sorted(r.sample_ids) == sorted(x.sample_id for x in recs)
    for x in recs:
        assert r[r.index_of(x.sample_id)].sample_id == x.sample_id
    with pytest.raises(KeyError, match="no sample_id 'nope'"):
        r.index_of("nope")
    assert r.nbytes <= 13 * 16 + sum(ix.block_starts.nbytes for ix in r.index) + r.shard_starts.nbytes


@pytest.mark.parametrize("overflow", ["truncate", "window"])
def test_streamed_dataset_gives_the_same_samples_and_batches(assets, tmp_path, overflow):
    tok = load_tokenizer(assets["tokenizer"])
    rows = [{"id": f"d{i}", "text": "def f(x):\n    return x * %d\n" % i * (1 + i % 3)} for i in range(17)]
    rows[5]["text"] = ""  # skipped: indices shift past it
    cfg = DatasetConfig(path=_jsonl(tmp_path / "d.jsonl", rows), id_field="id", max_length=16, overflow=overflow)
    whole = load_samples(cfg, tok)[0]
    src = DatasetSamples(cfg, tok, window_rows=4)
    assert len(src) == len(whole) and src.skipped >= 1
    for i, s in enumerate(whole):
        got = src[i]
        assert got.sample_id == s.sample_id == src.sample_id(i)
        assert np.array_equal(got.input_ids, s.input_ids) and np.array_equal(got.loss_mask, s.loss_mask)
    ids = [s.sample_id for s in whole]
    assert src.indices_of(ids[::-1]).tolist() == list(range(len(whole)))[::-1]
    with pytest.raises(KeyError, match="no sample_id 'zz'"):
        src.index_of("zz")
    batches = []
    for source in (whole, src):
        sampler = StepSampler(np.arange(len(whole)), 2, 2, 0, 1, seed=7)
        pf = StepPrefetcher(sampler, source, num_workers=2, depth=2)
        batches.append([[b.input_ids.tolist() for b in pf.next_step()] for _ in range(3)])
        pf.close()
    assert batches[0] == batches[1]


def _dataset_run(assets, out, **over):
    ds = {"path": assets["corpus"], "split": "train", "id_field": "id", "max_length": 48, "num_samples": 40}
    return {"output_dir": str(out), "student": {"path": assets["student"]},
            "data": {"train_dataset": ds, "eval_dataset": {**ds, "split": "validation", "num_samples": 8},
                     "tokenizer": assets["tokenizer"]},
            "loss": {"alpha": 1.0}, "micro_batch_size": 2, "grad_accum_steps": 1, "max_steps": 4, "eval_steps": 4,
            "log_steps": 1, "device": "cpu", "optim": {"warmup_steps": 1}, **over}


def _train_ids(run):
    import pyarrow.dataset as pads

    t = pads.dataset(run / "loss_logs", format="parquet", partitioning="hive").to_table().to_pandas()
    t = t[t["split"] == "train"]
    return sorted(zip(t["step"], t["sample_id"]))


def test_train_from_a_dataset_streams_it_at_one_and_two_ranks(assets, tmp_path):
    """The streaming pass is collective at 2 ranks (each tokenizes its part): both world sizes
    train on the same global samples per step."""
    from conftest import write_yaml
    from test_resume import _run_to_end

    got = {}
    for nproc in (1, 2):
        out = tmp_path / f"w{nproc}"
        cfg = write_yaml(tmp_path / f"w{nproc}.yaml", _dataset_run(assets, out, micro_batch_size=4 // nproc))
        code, _, err = _run_to_end(cfg, nproc)
        assert code == 0, err[-2000:]
        got[nproc] = _train_ids(out)
    assert got[1] == got[2] and len(got[1]) == 4 * 4
