"""The prefetching loader gives exactly the batches of the inline loader, keeps the sampler's
state exact, and reads zarr and parquet caches alike; inspect-cache on a real cache."""
import json

import numpy as np
import pytest
from helpers import synthetic_records

from pipeline.cache import finalize_cache, open_cache, open_writer, prepare_cache
from pipeline.cache.manifest import Manifest, TeacherEntry
from pipeline.student.sampler import StepPrefetcher, StepSampler, prefetch
from stages import inspect_cache

V, K = 60, 6


def _cache(d, backend, recs):
    m = Manifest(backend=backend, k=K, index_dtype="uint16", value_dtype="q8", index_coding="delta", vocab_size=V,
                 temperature=1.0, tokenizer_fingerprint="t", teachers=[TeacherEntry(path="/t", weight=1, fingerprint="f")],
                 dataset={}, dataset_fingerprint="d", max_length=32)
    st = prepare_cache(d, m)
    w = open_writer(d, m, 0, st.attempt, 8, 3)
    w.write(recs)
    w.close()
    finalize_cache(d)
    return open_cache(d, max_cached_bytes=2000)  # small LRU: evictions while threads read


def test_prefetching_loader_equals_inline_and_keeps_sampler_state(tmp_path):
    recs = synthetic_records(30, V, K, seed=11)
    readers = {b: _cache(tmp_path / b, b, recs) for b in ("parquet", "zarr")}
    runs = {}
    for name, reader, workers in (("inline", readers["parquet"], 0), ("threads", readers["parquet"], 2),
                                  ("zarr", readers["zarr"], 2)):
        s = StepSampler(np.arange(len(recs)), 4, 2, 0, 1, seed=3)
        loader = StepPrefetcher(s, reader, num_workers=workers, depth=3)
        steps = []
        for i in range(9):  # crosses an epoch boundary (3 steps per epoch)
            steps.append(loader.next_step())
            assert (s.epoch, s.position) == (i // 3, 8 * (i % 3 + 1))  # the consumed data only
        loader.close()
        runs[name] = steps
    for name in ("threads", "zarr"):
        for a_step, b_step in zip(runs["inline"], runs[name]):
            for a, b in zip(a_step, b_step):
                assert a.sample_ids == b.sample_ids
                for f in ("input_ids", "rows", "labels", "sample_index", "topk_ids", "topk_logprobs", "tail_logprob"):
                    assert np.array_equal(getattr(a, f).numpy(), getattr(b, f).numpy()), (name, f)


def test_prefetch_iterator_passes_items_and_errors():
    assert list(prefetch(iter(range(10)), depth=2)) == list(range(10))

    def boom():
        yield 1
        raise ValueError("bad block")

    with pytest.raises(ValueError, match="bad block"):
        list(prefetch(boom()))


def test_inspect_cache_json_text_plot_and_errors(caches, tmp_path, capsys):
    assert inspect_cache.main([str(caches["train"]), "--json", "--validate", "--plot", str(tmp_path / "h.png")]) == 0
    s = json.loads(capsys.readouterr().out)
    r = open_cache(caches["train"])
    assert s["backend"] == "parquet" and s["complete"] and s["validated"] and s["k"] == 8
    assert s["n_samples"] == len(r) and s["n_tokens"] == int(r.lengths().sum())
    assert 0 < s["bytes_per_token"] < 200 and s["positions_read"] == r.manifest.num_valid_positions
    assert 0 < s["topk_mass"]["q50"] <= 1.07 and s["teacher_entropy_nats"]["mean"] > 0
    assert (tmp_path / "h.png").stat().st_size > 0
    assert inspect_cache.main([str(caches["train"])]) == 0
    out = capsys.readouterr().out
    assert "bytes/token" in out and "top-k mass" in out
    assert inspect_cache.main([str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_block_shuffle_decodes_each_block_once_per_epoch(tmp_path):
    """With data.shuffle=block and an LRU of about `window` blocks every block is decoded once
    per epoch; a global permutation through the same LRU decodes blocks again and again."""
    recs = synthetic_records(60, V, K, seed=12, min_len=10, max_len=10)  # 8 shards, 23 blocks of <= 3 samples
    reader = _cache(tmp_path / "c", "parquet", recs)
    block_bytes = reader.read_block(0, 0).nbytes
    decodes = {}
    for shuffle in ("block", "global"):
        r = open_cache(tmp_path / "c", max_cached_bytes=2 * block_bytes)  # room for 2 blocks
        calls = []
        read = r.read_block
        r.read_block = lambda s, b: calls.append((s, b)) or read(s, b)
        groups = r.block_ids() if shuffle == "block" else None
        assert groups is None or (len(groups) == 60 and len(np.unique(groups)) == sum(r.num_blocks(s) for s in range(len(r.shards))))
        s = StepSampler(np.arange(60), 4, 1, 0, 1, seed=5, groups=groups, window=2)
        order = s.epoch_order(0)
        assert sorted(order) == list(range(60))
        for i in order:
            r[int(i)]
        decodes[shuffle] = len(calls)
        if shuffle == "block":
            assert len(calls) == len(set(calls)) == len(np.unique(groups)) == 23
            assert not np.array_equal(order, np.sort(order))  # shuffled, not sequential
            again = StepSampler(np.arange(60), 4, 1, 0, 1, seed=5, groups=groups, window=2).epoch_order(0)
            assert np.array_equal(order, again)  # deterministic (exact resume)
    assert decodes["global"] > 2 * decodes["block"]


def test_collate_packs_without_crossing_sample_boundaries():
    """Packed and padded collation of the same records: same valid positions, labels and
    teacher targets in the same order; position ids restart per sample; every label is the
    next token of its own sample; the rows hold at most pack_length tokens."""
    from pipeline.data.batch import collate, pack_rows

    recs = synthetic_records(11, V, K, seed=4, min_len=3, max_len=20)
    padded, packed = collate(recs), collate(recs, pack_length=32)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0] and packed.input_ids.shape[1] <= 32
    for f in ("labels", "sample_index", "n_tokens", "topk_ids", "topk_logprobs", "tail_logprob", "topk_mass_sum",
              "teacher_entropy_sum"):
        assert np.array_equal(getattr(packed, f).numpy(), getattr(padded, f).numpy()), f
    L = packed.input_ids.shape[1]
    flat_ids, flat_pos = packed.input_ids.reshape(-1), packed.position_ids.reshape(-1)
    for n, (i, rec) in enumerate(zip(packed.sample_index.tolist(), [recs[j] for j in packed.sample_index.tolist()])):
        row = int(packed.rows[n])
        t = int(flat_pos[row])  # the position inside its sample
        assert row % L + 1 < L and int(flat_pos[row + 1]) == t + 1  # the target is in the same sample
        assert flat_ids[row] == rec.input_ids[t] and packed.labels[n] == rec.input_ids[t + 1]
    assert packed.n_valid == padded.n_valid == sum(int(r.loss_mask[1:].sum()) for r in recs)
    for r, segs in enumerate(packed.segments):  # contiguous ranges covering the row; position 0 at each start
        assert segs[0][0] == 0 and segs[-1][1] == L and all(a[1] == b[0] for a, b in zip(segs, segs[1:]))
        assert all(int(packed.position_ids[r, s]) == 0 for s, _ in segs)
    assert sum(len(segs) for segs in packed.segments) >= len(recs) and padded.segments is None
    rows = pack_rows([5, 9, 3, 7, 2], 10)
    assert sorted(i for r in rows for i in r) == list(range(5))
    assert all(sum([5, 9, 3, 7, 2][i] for i in r) <= 10 for r in rows) and len(rows) == 3
    pad_only = collate(recs[:2], pad_only=True, pack_length=32)
    assert pad_only.n_valid == 0 and pad_only.sample_ids == [None, None]


def test_open_shard_lru_evicts_one_handle_at_a_time():
    """The open-handle LRU keeps the most recently used shards open when it fills: reading a
    working set as large as its capacity, round after round, opens each shard once; one shard
    more than the capacity evicts exactly one handle (closed) per new shard."""
    from pipeline.cache.handles import HandleLRU

    closed = []
    lru = HandleLRU(lambda k: [k], capacity=4, close=closed.append)
    for _ in range(5):
        for k in range(4):
            assert lru.get(k) == [k]
    assert lru.opens == 4 and closed == []
    lru.get(4)  # the least recently used (0) goes, the rest stay open
    assert closed == [[0]] and len(lru) == 4 and lru.opens == 5
    for k in (1, 2, 3, 4):
        lru.get(k)
    assert lru.opens == 5
    lru.clear()
    assert sorted(closed) == [[0], [1], [2], [3], [4]] and len(lru) == 0
    with pytest.raises(ValueError, match="capacity 0"):
        HandleLRU(list, capacity=0)


def test_open_shard_lru_opens_a_shard_once_under_concurrent_misses():
    """Threads that miss the same shard at once wait for one open (a remote shard's footer or
    bytes are fetched once); a failed open is raised in its thread and retried by the next."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.cache.handles import HandleLRU

    calls, fail = [], threading.Event()

    def slow_open(k):
        calls.append(k)
        time.sleep(0.05)
        if fail.is_set():
            fail.clear()
            raise OSError("store unreachable")
        return [k]

    lru = HandleLRU(slow_open, capacity=4)
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(lru.get, ["a"] * 6)) == [["a"]] * 6
    assert calls == ["a"] and lru.opens == 1
    fail.set()
    with pytest.raises(OSError, match="unreachable"):
        lru.get("b")
    assert lru.get("b") == ["b"] and calls == ["a", "b", "b"]
