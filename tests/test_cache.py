"""Parquet cache: round trip, completion, resume, refusal of incompatible reruns, validation."""
import json

import numpy as np
import pytest
from helpers import synthetic_records

from pipeline.cache import finalize_cache, open_cache, open_writer, prepare_cache, read_manifest
from pipeline.cache.manifest import Manifest, TeacherEntry

V, K = 50, 5


def _manifest(**over) -> Manifest:
    base = dict(backend="parquet", k=K, index_dtype="uint16", value_dtype="float32", vocab_size=V, temperature=1.0,
                tokenizer_fingerprint="tok", teachers=[TeacherEntry(path="/t", weight=1.0, fingerprint="f")],
                dataset={}, dataset_fingerprint="ds", max_length=32)
    return Manifest(**{**base, **over})


def _write(d, records, manifest=None, rank=0, per_shard=4):
    m = manifest or _manifest()
    state = prepare_cache(d, m)
    w = open_writer(d, m, rank, state.attempt, per_shard, 2)
    todo = [r for r in records if r.sample_id not in state.done_ids]
    w.write(todo)
    w.close()
    return state, todo


def test_round_trip_exact(tmp_path):
    recs = synthetic_records(10, V, K, seed=1)
    _write(tmp_path, recs)
    assert not read_manifest(tmp_path).complete
    with pytest.raises(ValueError, match="incomplete"):
        open_cache(tmp_path)
    assert len(open_cache(tmp_path, allow_incomplete=True)) == 10
    m = finalize_cache(tmp_path)
    assert m.complete and m.num_samples == 10 and len(m.shards) == 3
    assert m.num_tokens == sum(len(r.input_ids) for r in recs)
    r = open_cache(tmp_path)
    for rec in recs:
        got = r[r.index_of(rec.sample_id)]
        np.testing.assert_array_equal(got.input_ids, rec.input_ids)
        np.testing.assert_array_equal(got.loss_mask, rec.loss_mask)
        np.testing.assert_array_equal(got.topk_ids, rec.topk_ids)
        np.testing.assert_array_equal(got.topk_logprobs, rec.topk_logprobs)
        np.testing.assert_array_equal(got.tail_logprob, rec.tail_logprob)
    with pytest.raises(KeyError, match="nope"):
        r.index_of("nope")


def test_rerun_skips_closed_shards_and_refuses_other_settings(tmp_path):
    recs = synthetic_records(10, V, K, seed=2)
    _write(tmp_path, recs[:8])  # "crash" after 2 closed shards, before finalize
    (tmp_path / "part-r00000-a1-00009.parquet.tmp").write_text("half written")
    state, todo = _write(tmp_path, recs)
    assert state.done_ids == {r.sample_id for r in recs[:8]}
    assert [r.sample_id for r in todo] == ["s8", "s9"]
    assert not list(tmp_path.glob("*.tmp"))
    finalize_cache(tmp_path)
    assert sorted(open_cache(tmp_path).sample_ids) == sorted(r.sample_id for r in recs)
    with pytest.raises(ValueError, match="k: 5 != 7"):
        prepare_cache(tmp_path, _manifest(k=7))


def test_validation_names_shard_and_sample(tmp_path):
    recs = synthetic_records(6, V, K, seed=3)
    recs[4].topk_logprobs[2] = recs[4].topk_logprobs[2][::-1].copy()  # unsorted
    _write(tmp_path, recs)
    finalize_cache(tmp_path)
    with pytest.raises(ValueError, match=r"shard part-r00000-a\d+-00001.parquet sample_id 's4': .*not sorted"):
        open_cache(tmp_path)


def test_checksum_mismatch_is_refused(tmp_path):
    _write(tmp_path, synthetic_records(4, V, K, seed=4))
    m = finalize_cache(tmp_path)
    doc = json.loads((tmp_path / "manifest.json").read_text())
    doc["shards"][0]["sha256"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=f"{m.shards[0].file} checksum mismatch"):
        open_cache(tmp_path)
