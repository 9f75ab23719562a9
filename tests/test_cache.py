"""Cache conformance suite: every case runs against both backends (parquet, zarr).

Round trips for each value coding, completion, resume, refusal of incompatible reruns,
validation naming shard and sample, and the faults of issue 3 (truncated / garbage shard,
hand-edited manifest, missing shard, NaN teacher output, foreign directory).
"""
import json
import shutil

import numpy as np
import pytest
from helpers import synthetic_records

from pipeline.cache import cache_bytes, finalize_cache, open_cache, open_writer, prepare_cache, read_manifest, validate_cache
from pipeline.cache.codec import reconstruction_kl
from pipeline.cache.store import closed_shards
from pipeline.cache.manifest import Manifest, TeacherEntry

V, K = 50, 5
BACKENDS = ["parquet", "zarr"]


def _manifest(backend, **over) -> Manifest:
    base = dict(backend=backend, k=K, index_dtype="uint16", value_dtype="float32", vocab_size=V, temperature=1.0,
                tokenizer_fingerprint="tok", teachers=[TeacherEntry(path="/t", weight=1.0, fingerprint="f")],
                dataset={}, dataset_fingerprint="ds", max_length=32)
    return Manifest(**{**base, **over})


def _write(d, records, manifest, rank=0, per_shard=4):
    state = prepare_cache(d, manifest)
    w = open_writer(d, manifest, rank, state.attempt, per_shard, 2)
    todo = [r for r in records if r.sample_id not in state.done_ids]
    w.write(todo)
    w.close()
    return state, todo


def _shard_path(d, i=0):
    return d / closed_shards(d)[i].file


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value_dtype,index_coding", [("float32", "plain"), ("float32", "delta"), ("float16", "plain"),
                                                      ("bfloat16", "delta"), ("q8", "delta"), ("q8", "plain")])
@pytest.mark.parametrize("padded", [False, True])
def test_round_trip(tmp_path, backend, value_dtype, index_coding, padded):
    recs = synthetic_records(10, V, K, seed=1, padded=padded)
    m = _manifest(backend, value_dtype=value_dtype, index_coding=index_coding, target_type="sampled" if padded else "topk")
    _write(tmp_path, recs, m)
    r = validate_cache(tmp_path, allow_incomplete=True)
    assert len(r) == 10 and not r.manifest.complete
    assert cache_bytes(tmp_path) > 0
    streamed = {rec.sample_id: rec for rec in r}
    assert list(streamed) == r.sample_ids
    kl_bound = {"float32": 1e-12, "float16": 1e-6, "bfloat16": 1e-4, "q8": m.q8_step ** 2 / 8}[value_dtype]  # |error| <= step/2
    for rec in recs:
        got = r[r.index_of(rec.sample_id)]
        np.testing.assert_array_equal(streamed[rec.sample_id].topk_ids, got.topk_ids)
        np.testing.assert_array_equal(got.input_ids, rec.input_ids)
        np.testing.assert_array_equal(got.loss_mask, rec.loss_mask)
        assert got.topk_ids.dtype == np.int32 and got.topk_logprobs.dtype == np.float32
        np.testing.assert_array_equal(np.isneginf(got.topk_logprobs), np.isneginf(rec.topk_logprobs))
        if value_dtype == "float32":
            np.testing.assert_array_equal(got.topk_ids, rec.topk_ids)
            np.testing.assert_array_equal(got.topk_logprobs, rec.topk_logprobs)
            np.testing.assert_array_equal(got.tail_logprob, rec.tail_logprob)
        else:  # lossy values: same id → value map up to the coding's error, order may differ on ties
            for t in range(len(rec.topk_ids)):
                real = ~np.isneginf(rec.topk_logprobs[t])
                want = dict(zip(rec.topk_ids[t][real], rec.topk_logprobs[t][real]))
                have = dict(zip(got.topk_ids[t][real], got.topk_logprobs[t][real]))
                assert want.keys() == have.keys()
                stored = np.array([have[i] for i in want])
                assert reconstruction_kl(np.array([list(want.values())]), stored[None])[0] <= kl_bound
            np.testing.assert_allclose(got.tail_logprob, rec.tail_logprob, rtol=2e-3, atol=1e-6)
    m = finalize_cache(tmp_path)
    assert m.complete and m.num_samples == 10 and len(m.shards) == 3
    assert m.num_tokens == sum(len(r.input_ids) for r in recs)
    with pytest.raises(KeyError, match="nope"):
        open_cache(tmp_path).index_of("nope")


@pytest.mark.parametrize("backend", BACKENDS)
def test_incomplete_refused_and_small_lru_still_correct(tmp_path, backend):
    recs = synthetic_records(12, V, K, seed=7)
    _write(tmp_path, recs, _manifest(backend))
    with pytest.raises(ValueError, match="incomplete"):
        open_cache(tmp_path)
    finalize_cache(tmp_path)
    tiny = open_cache(tmp_path, max_cached_bytes=1)  # every access evicts: decode per miss
    for i in np.random.default_rng(0).permutation(len(recs)):
        rec = recs[i]
        np.testing.assert_array_equal(tiny[tiny.index_of(rec.sample_id)].topk_logprobs, rec.topk_logprobs)
    assert len(tiny._lru) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerun_skips_closed_shards_and_refuses_other_settings(tmp_path, backend):
    recs = synthetic_records(10, V, K, seed=2)
    m = _manifest(backend)
    _write(tmp_path, recs[:8], m)  # "crash" after 2 closed shards, before finalize
    suffix = ".parquet" if backend == "parquet" else ".zarr"
    (tmp_path / f"part-r00000-a1-00009{suffix}.tmp").write_text("half written")
    unmarked = tmp_path / f"part-r00000-a1-00010{suffix}"  # renamed but crashed before its marker
    shutil.copytree(_shard_path(tmp_path), unmarked) if backend == "zarr" else shutil.copy(_shard_path(tmp_path), unmarked)
    state, todo = _write(tmp_path, recs, m)
    assert state.done_ids == {r.sample_id for r in recs[:8]}
    assert [r.sample_id for r in todo] == ["s8", "s9"]
    assert not list(tmp_path.glob("*.tmp")) and not unmarked.exists()
    finalize_cache(tmp_path)
    assert sorted(open_cache(tmp_path).sample_ids) == sorted(r.sample_id for r in recs)
    before = sorted(p.name for p in tmp_path.iterdir())
    for change, msg in [(dict(k=7), "k: 5 != 7"), (dict(value_dtype="q8"), "value_dtype: 'float32' != 'q8'"),
                        (dict(dataset_fingerprint="other"), "dataset_fingerprint"),
                        (dict(sample_seed=1), "sample_seed: 0 != 1"),
                        (dict(backend="zarr" if backend == "parquet" else "parquet"), "backend")]:
        with pytest.raises(ValueError, match=msg):
            prepare_cache(tmp_path, _manifest(**{"backend": backend, **change}))
    assert sorted(p.name for p in tmp_path.iterdir()) == before and read_manifest(tmp_path).complete


@pytest.mark.parametrize("backend", BACKENDS)
def test_validation_names_shard_and_sample(tmp_path, backend):
    recs = synthetic_records(6, V, K, seed=3)
    recs[4].topk_logprobs[2] = recs[4].topk_logprobs[2][::-1].copy()  # unsorted
    m = _manifest(backend)
    # the writer refuses it: nothing of that shard is written
    with pytest.raises(ValueError, match=r"sample_id 's4': topk_logprobs not sorted descending"):
        _write(tmp_path, recs, m)
    assert [s.num_samples for s in read_manifest(tmp_path).shards] == [] and len(list(tmp_path.glob("*.done.json"))) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fault", ["nan", "out_of_vocab", "positive"])
def test_bad_teacher_output_refused_by_writer(tmp_path, backend, fault):
    recs = synthetic_records(3, V, K, seed=5)
    if fault == "nan":
        recs[1].topk_logprobs[0, 0] = np.nan
    elif fault == "out_of_vocab":
        recs[1].topk_ids[0, 1] = V + 3
    else:
        recs[1].topk_logprobs[0] += 50.0
    with pytest.raises(ValueError, match="sample_id 's1'"):
        _write(tmp_path, recs, _manifest(backend), per_shard=10)
    assert not list(tmp_path.glob("part-*"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reader_finds_bad_records_written_by_others(tmp_path, backend):
    """A record that slipped past a writer (older code, another tool) is named on read."""
    recs = synthetic_records(6, V, K, seed=3)
    m = _manifest(backend)
    _write(tmp_path, recs, m)
    finalize_cache(tmp_path)
    from pipeline.cache import store
    saved = store.check_block
    store.check_block = lambda *a, **k: None
    try:
        shutil.rmtree(tmp_path)
        bad = synthetic_records(6, V, K, seed=3)
        bad[4].topk_logprobs[2] = bad[4].topk_logprobs[2][::-1].copy()
        _write(tmp_path, bad, m)
        finalize_cache(tmp_path)
    finally:
        store.check_block = saved
    r = open_cache(tmp_path)
    with pytest.raises(ValueError, match=r"shard part-r00000-a\d+-00001\.\w+ sample_id 's4': .*not sorted"):
        r[r.index_of("s4")]
    with pytest.raises(ValueError, match="'s4'"):
        r.validate()


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_truncated_missing_shards(tmp_path, backend):
    recs = synthetic_records(8, V, K, seed=4)
    _write(tmp_path, recs, _manifest(backend))
    m = finalize_cache(tmp_path)
    path = _shard_path(tmp_path, 1)
    target = path if path.is_file() else sorted(p for p in path.rglob("c/*") if p.is_file())[0]
    original = target.read_bytes()
    target.write_bytes(original[: len(original) // 2])  # truncated
    with pytest.raises(ValueError, match=f"shard {m.shards[1].file} checksum mismatch"):
        open_cache(tmp_path)
    with pytest.raises(ValueError, match=f"shard {m.shards[1].file}.*unreadable"):
        r = open_cache(tmp_path, verify=False)
        [r[i] for i in range(len(r))]
    target.write_bytes(b"\x00garbage" * 50)  # overwritten with garbage
    with pytest.raises(ValueError, match="checksum mismatch"):
        open_cache(tmp_path)
    target.write_bytes(original)
    assert len(open_cache(tmp_path)) == 8
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {m.shards[1].file} listed but missing"):
        open_cache(tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_edited_manifest(tmp_path, backend):
    _write(tmp_path, synthetic_records(4, V, K, seed=4), _manifest(backend))
    m = finalize_cache(tmp_path)
    path = tmp_path / "manifest.json"
    good = json.loads(path.read_text())
    for edit, msg in [(lambda d: d.update(k="many"), r"manifest.json: invalid manifest at k"),
                      (lambda d: d.pop("vocab_size"), "invalid manifest at vocab_size"),
                      (lambda d: d["shards"][0].update(sha256="0" * 64), f"{m.shards[0].file} checksum mismatch"),
                      (lambda d: d.update(num_samples=99), "manifest says 99 samples"),
                      (lambda d: d.update(k=4), r"do not match .* k=4"),
                      (lambda d: d["shards"].pop(), "manifest and closed shards disagree")]:
        doc = json.loads(json.dumps(good))
        edit(doc)
        path.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=msg):
            open_cache(tmp_path).validate()
    path.write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: invalid manifest"):
        open_cache(tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_ids_across_shards_and_foreign_directory(tmp_path, backend):
    recs = synthetic_records(4, V, K, seed=6)
    m = _manifest(backend)
    state = prepare_cache(tmp_path, m)
    for rank in (0, 1):  # two ranks wrongly given the same samples
        w = open_writer(tmp_path, m, rank, state.attempt, 10, 2)
        w.write(recs)
        w.close()
    finalize_cache(tmp_path)
    with pytest.raises(ValueError, match=r"duplicate sample_id 's0' in shards part-r00000.* and part-r00001"):
        open_cache(tmp_path)
    other = tmp_path.parent / f"not-a-cache-{backend}"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a teacher cache"):
        prepare_cache(other, m)
    assert (other / "notes.txt").read_text() == "mine"
