"""Cache conformance suite: every case runs against both backends (parquet, zarr).

Round trips for each value coding, completion, resume, refusal of incompatible reruns,
validation naming shard and sample, and the faults of issue 3 (truncated / garbage shard,
hand-edited manifest, missing shard, NaN teacher output, foreign directory).
"""
import errno
import json
import shutil
import threading
import time

import numpy as np
import pytest
from helpers import synthetic_records

from pipeline.cache import cache_bytes, finalize_cache, open_cache, open_writer, prepare_cache, read_manifest, validate_cache
from pipeline.cache.codec import reconstruction_kl
from pipeline.cache.shards import closed_shards
from pipeline.cache.manifest import Manifest, TeacherEntry
from pipeline.storage.errors import StorageError

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
    found = state.done.find([r.sample_id for r in records])
    todo = [r for r, i in zip(records, found) if i < 0]
    w.write(todo)
    w.close()
    return state, todo


def _shard_path(d, i=0):
    return d / closed_shards(d)[i].file


def _read_every_shard(d, **kw):
    """Open the cache at ``d`` and read the first sample of each shard in order (the reads
    that check shard checksums lazily); returns the reader."""
    r = open_cache(d, **kw)
    for s in range(len(r.shards)):
        r[int(r.shard_starts[s])]
    return r


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
    assert len(state.done) == 8 and (state.done.find([r.sample_id for r in recs]) >= 0).tolist() == [True] * 8 + [False] * 2
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
    from pipeline.cache import writer as cache_writer  # the writer's check_block, not the reader's
    saved = cache_writer.check_block
    cache_writer.check_block = lambda *a, **k: None
    try:
        shutil.rmtree(tmp_path)
        bad = synthetic_records(6, V, K, seed=3)
        bad[4].topk_logprobs[2] = bad[4].topk_logprobs[2][::-1].copy()
        _write(tmp_path, bad, m)
        finalize_cache(tmp_path)
    finally:
        cache_writer.check_block = saved
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
    # parquet: at open (the index is in the footer); zarr (a data chunk): at the first read of shard 1
    with pytest.raises(ValueError, match=f"shard {m.shards[1].file} checksum mismatch"):
        _read_every_shard(tmp_path)
    with pytest.raises(ValueError, match=f"shard {m.shards[1].file}.*unreadable"):
        r = open_cache(tmp_path, verify=False)
        [r[i] for i in range(len(r))]
    target.write_bytes(b"\x00garbage" * 50)  # overwritten with garbage
    with pytest.raises(ValueError, match="checksum mismatch"):
        _read_every_shard(tmp_path)
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
@pytest.mark.parametrize("colliding", [False, True])
def test_duplicate_ids_across_shards_and_foreign_directory(tmp_path, monkeypatch, backend, colliding):
    if colliding:  # every ID hash collides: the duplicate is still found by its ID, no other is reported
        from test_sample_ids import collide_hashes

        collide_hashes(monkeypatch)
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
    other = tmp_path.parent / f"not-a-cache-{backend}-{colliding}"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a teacher cache"):
        prepare_cache(other, m)
    assert (other / "notes.txt").read_text() == "mine"


def _corrupt_targets(shard):
    """Flip one byte inside the ``topk_values`` data of a shard, leaving its index (sample IDs,
    lengths, teacher NLL; the parquet footer) readable."""
    if shard.is_file():
        import pyarrow.parquet as pq

        rg = pq.ParquetFile(shard).metadata.row_group(0)
        col = next(rg.column(j) for j in range(rg.num_columns) if rg.column(j).path_in_schema.startswith("topk_values"))
        target, at = shard, col.data_page_offset + col.total_compressed_size // 2
    else:
        target = sorted(p for p in (shard / "topk_values").rglob("*") if p.is_file() and "c" in p.parts)[0]
        at = target.stat().st_size // 2
    data = bytearray(target.read_bytes())
    data[at] ^= 0xFF
    target.write_bytes(bytes(data))


@pytest.mark.parametrize("backend", BACKENDS + ["parquet-without-page-checksums"])
def test_open_reads_no_shard_bytes_and_checks_each_shard_once_on_first_read(tmp_path, backend, monkeypatch):
    """Opening hashes nothing. A shard without page checksums (zarr, older parquet) is hashed
    once on the first read of any of its blocks (also under concurrent readers); a parquet shard
    whose pages carry CRC-32s is never hashed to be read. validate() hashes every shard. Data
    corruption that leaves the index readable is reported on the first read of that shard as a
    checksum mismatch naming cache and shard (a page-checksummed shard is hashed then, once)."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.cache import lifecycle, reader as cache_reader
    from pipeline.cache.parquet import ParquetBackend

    hashed_on_read = backend != "parquet"
    if backend == "parquet-without-page-checksums":  # shards as written before page checksums
        backend = "parquet"
        with monkeypatch.context() as m:
            m.setattr(lifecycle, "backend_for", lambda name, *a: ParquetBackend(*a, page_checksums=False))
            _write(tmp_path, synthetic_records(12, V, K, seed=9), _manifest(backend))  # 3 shards of 2 blocks
    else:
        _write(tmp_path, synthetic_records(12, V, K, seed=9), _manifest(backend))
    finalize_cache(tmp_path)
    calls: list[str] = []
    real = cache_reader.dir_sha256
    monkeypatch.setattr(cache_reader, "dir_sha256", lambda path: calls.append(path.name) or real(path))
    shards = [s.file for s in closed_shards(tmp_path)]
    r = open_cache(tmp_path)
    assert calls == [] and len(r) == 12
    first_of = [int(r.shard_starts[s]) for s in range(3)]
    r[first_of[1]]
    assert calls == ([shards[1]] if hashed_on_read else [])
    for i in range(len(r)):  # every block of every shard
        r[i]
    assert sorted(calls) == (sorted(shards) if hashed_on_read else [])
    calls.clear()
    concurrent = open_cache(tmp_path, max_cached_bytes=1)  # every access decodes a block
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda i: concurrent[i], list(range(len(r))) * 3))
    assert sorted(calls) == (sorted(shards) if hashed_on_read else [])
    calls.clear()
    open_cache(tmp_path).validate()
    assert sorted(calls) == sorted(shards)
    calls.clear()
    unverified = open_cache(tmp_path, verify=False)
    [unverified[i] for i in range(len(unverified))]
    assert calls == []

    _corrupt_targets(tmp_path / shards[2])
    r = open_cache(tmp_path)
    assert calls == []
    r[first_of[0]], r[first_of[1]]
    for _ in range(2):  # the mismatch is remembered: the shard is not hashed again
        with pytest.raises(ValueError, match=f"cache {tmp_path}: shard {shards[2]} checksum mismatch"):
            r[first_of[2]]
    assert calls == (shards if hashed_on_read else [shards[2]])
    with pytest.raises(ValueError, match=f"shard {shards[2]} checksum mismatch"):
        validate_cache(tmp_path)
    if not hashed_on_read:  # without the hash, the page checksum itself refuses the block
        with pytest.raises(ValueError, match=f"shard {shards[2]} block 0 unreadable.*CRC checksum verification failed"):
            open_cache(tmp_path, verify=False)[first_of[2]]


def _fail_second_shard(writer, monkeypatch) -> list[str]:
    """Make ``writer``'s backend write shard 1 completely and then raise ENOSPC (so its bytes
    must be cleaned up); returns the list of thread names that wrote shards."""
    real, threads = writer.backend.write_shard, []

    def write_shard(path, arrays, k, block_size):
        threads.append(threading.current_thread().name)
        real(path, arrays, k, block_size)
        if "-00001." in path.name:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.backend, "write_shard", write_shard)
    return threads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("surfaces_at", ["write", "close"])
def test_background_writer_error_surfaces_as_storage_error(tmp_path, backend, monkeypatch, surfaces_at):
    """ENOSPC in the writer thread on shard 1 of 3: the next write (or close) raises the
    StorageError naming the shard and cache; shard 0 stays closed, nothing of shards 1 and 2
    is on disk, and the thread is gone."""
    recs = synthetic_records(10, V, K, seed=8)
    m = _manifest(backend)
    state = prepare_cache(tmp_path, m)
    w = open_writer(tmp_path, m, 0, state.attempt, 4, 2)
    threads = _fail_second_shard(w, monkeypatch)
    suffix = ".parquet" if backend == "parquet" else ".zarr"
    shard1 = f"part-r00000-a{state.attempt}-00001{suffix}"
    with pytest.raises(StorageError, match=rf"shard {shard1} of the cache {tmp_path}: No space left on device") as e:
        w.write(recs[:8])  # shards 0 and 1 queued
        if surfaces_at == "write":
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # the failure reaches the caller at its next write
                w.write([])
                time.sleep(0.01)
            pytest.fail("the writer thread's error did not reach write() within 60 s")
        w.write(recs[8:])
        w.close()
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(StorageError, match=shard1):  # the writer stays failed
        w.close()
    assert threads == ["cache-writer-r0"] * len(threads) and len(threads) == 2  # shard 2 never written
    assert not [t for t in threading.enumerate() if t.name.startswith("cache-writer")]
    shard0 = f"part-r00000-a{state.attempt}-00000{suffix}"
    assert [s.file for s in closed_shards(tmp_path)] == [shard0]
    assert sorted(p.name for p in tmp_path.glob("part-*")) == [shard0, shard0 + ".done.json"]
    assert not read_manifest(tmp_path).complete


@pytest.mark.parametrize("backend", BACKENDS)
def test_background_writer_bytes_equal_serial_writer(tmp_path, backend, monkeypatch):
    """The same records through the background writer (fed a few at a time, as the teacher
    loop does) and through the serial writer: same shards, markers (sha256 included) and
    records bit for bit."""
    recs = synthetic_records(11, V, K, seed=10)
    m = _manifest(backend, value_dtype="q8", index_coding="delta")
    out = {}
    for queue_shards in (0, 1, 2):
        d = tmp_path / f"q{queue_shards}"
        prepare_cache(d, m.model_copy(deep=True))
        w = open_writer(d, m, 0, 7, 4, 2, queue_shards=queue_shards)
        real, threads = w.backend.write_shard, []
        monkeypatch.setattr(w.backend, "write_shard",
                            lambda *a, real=real, threads=threads: threads.append(threading.current_thread()) or real(*a))
        for i in range(0, len(recs), 3):
            w.write(recs[i: i + 3])
        entries = w.close()
        assert len(threads) == 3
        assert all((t is threading.main_thread()) == (queue_shards == 0) for t in threads)
        assert [e.model_dump() for e in entries] == [s.model_dump() for s in closed_shards(d)]
        out[queue_shards] = d
    serial = open_cache(out[0], allow_incomplete=True)
    for q in (1, 2):
        assert [s.model_dump() for s in closed_shards(out[q])] == [s.model_dump() for s in closed_shards(out[0])]
        got = open_cache(out[q], allow_incomplete=True)
        assert got.sample_ids == serial.sample_ids
        for a, b in zip(got, serial):
            for name in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logprob"):
                x, y = getattr(a, name), getattr(b, name)
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), f"{a.sample_id} {name}"
            assert a.teacher_nll_sum == b.teacher_nll_sum


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_close_at_their_byte_budget(tmp_path, backend):
    """``shard_bytes`` closes a shard before ``samples_per_shard`` once its records' arrays hold
    that many bytes: every shard but the last reaches the budget by its last record only, and
    every record is read back."""
    from pipeline.cache.records import record_nbytes

    recs = synthetic_records(13, V, K, seed=11)
    budget = 3 * record_nbytes(recs[0])
    m = _manifest(backend)
    state = prepare_cache(tmp_path, m)
    w = open_writer(tmp_path, m, 0, state.attempt, 100, 2, shard_bytes=budget)
    w.write(recs)
    entries = w.close()
    assert len(entries) > 1
    start = 0
    for e in entries:
        sizes = [record_nbytes(r) for r in recs[start: start + e.num_samples]]
        assert sum(sizes) >= budget or e is entries[-1]
        assert sum(sizes[:-1]) < budget
        start += e.num_samples
    assert start == len(recs)
    finalize_cache(tmp_path)
    got = open_cache(tmp_path)
    assert sorted(got.sample_ids) == sorted(r.sample_id for r in recs)
