"""The ``streams`` shuffle: the same steps at every world size dividing the stream count, exact
resume from (epoch, position), disjoint blocks per rank, a bounded shuffle buffer, each block
decoded once per epoch through the reader; the choice of shuffle from the config."""
import numpy as np
import pytest
from helpers import synthetic_records
from test_loader import _cache

from pipeline.config import ConfigError
from pipeline.config.train import TrainDataConfig
from pipeline.student.sampler import StepSampler
from pipeline.student.streams import StreamSampler, build_sampler, default_streams

N, BLOCK, SHARD = 1000, 8, 64  # 16 shards of 8 blocks (the last shard shorter)
GROUPS, REGIONS = np.arange(N) // BLOCK, np.arange(N) // SHARD


def _data(**kw) -> TrainDataConfig:
    return TrainDataConfig(train_cache="c", **kw)


def _sampler(W, r, mbs, accum=1, indices=None, **kw):
    idx = np.arange(N) if indices is None else indices
    return StreamSampler(idx, mbs, accum, r, W, seed=7, groups=GROUPS[idx], regions=REGIONS[idx], **kw)


def test_same_steps_at_1_2_4_ranks_every_sample_once_per_epoch_and_exact_resume():
    """A global batch of 12 (not a multiple of the 8 streams) at 1, 2 and 4 ranks (micro-batches
    of 12/W, or 3 × 1 at 4 ranks): each step's samples over all ranks are the same set; an epoch
    visits no sample twice and drops fewer than streams + one global batch; a sampler set to a mid-epoch (epoch, position) continues
    with exactly the steps of the uninterrupted one; another seed gives another order."""
    n_steps = 2 * _sampler(1, 0, 12).steps_per_epoch + 5  # into the third epoch
    runs = {}
    for W, mbs, accum in ((1, 12, 1), (2, 6, 1), (4, 1, 3)):
        ranks = [_sampler(W, r, mbs, accum) for r in range(W)]
        runs[W] = [np.sort(np.concatenate([np.concatenate(s.next_step()) for s in ranks])) for _ in range(n_steps)]
        assert all(len(step) == 12 for step in runs[W])
    for W in (2, 4):
        assert all(np.array_equal(a, b) for a, b in zip(runs[1], runs[W])), W
    spe = _sampler(1, 0, 12).steps_per_epoch
    for e in range(2):
        epoch = np.concatenate(runs[1][e * spe:(e + 1) * spe])
        assert len(np.unique(epoch)) == len(epoch) > N - 8 - 12
    assert not np.array_equal(runs[1][0], runs[1][spe])  # epochs differ

    uninterrupted = _sampler(2, 1, 6)
    steps = [uninterrupted.next_step() for _ in range(spe + 7)]
    resumed = _sampler(2, 1, 6, epoch=1, position=3 * 12)  # what a checkpoint after step spe + 3 holds
    for want in steps[spe + 3:]:
        assert all(np.array_equal(a, b) for a, b in zip(resumed.next_step(), want))
    other = StreamSampler(np.arange(N), 8, 1, 0, 1, seed=8, groups=GROUPS, regions=REGIONS)
    assert not np.array_equal(other.epoch_order(0), _sampler(1, 0, 8).epoch_order(0))


def test_ranks_read_disjoint_blocks_through_a_bounded_buffer():
    """At 4 ranks of 8 streams each rank's epoch touches blocks no other rank touches, but for
    the blocks cut by a stream boundary (at most streams - 1); inside a stream the samples of the
    i-th visited block are drawn between its (i)-th and (i + window)-th block's worth, so at most
    window + 1 blocks are open at a time; window 1 reads block after block; a stream reads its
    shards one after another (at most 2 open at once)."""
    touched = [set(GROUPS[_sampler(4, r, 2).epoch_order(0)]) for r in range(4)]
    shared = sum(len(touched[a] & touched[b]) for a in range(4) for b in range(a + 1, 4))
    assert shared <= 8 - 1 and sum(len(t) for t in touched) >= N // BLOCK
    for window in (1, 3):
        s = _sampler(1, 0, 8, window=window, streams=4)
        seq = s.block_sequence(0)
        for v in range(4):
            blocks = GROUPS[s.stream_order(0, v, seq)]
            first = {b: i for i, b in reversed(list(enumerate(blocks)))}
            last = {b: i for i, b in enumerate(blocks)}
            open_at = [sum(first[b] <= i <= last[b] for b in first) for i in range(len(blocks))]
            assert max(open_at) <= window + 1, (window, max(open_at))
            if window == 1:  # no mixing: each block's samples together
                assert all(last[b] - first[b] + 1 == np.sum(blocks == b) for b in first)
            shards = REGIONS[s.stream_order(0, v, seq)]
            open_shards = [len({sh for sh in set(shards) if np.flatnonzero(shards == sh)[0] <= i
                                <= np.flatnonzero(shards == sh)[-1]}) for i in range(0, len(shards), 5)]
            assert max(open_shards) <= 2


def test_a_subset_of_samples_and_bad_arguments():
    """A selection of samples (sorted indices, blocks partly selected) is drawn from, only it;
    streams not a multiple of the world size, unsorted groups and too few samples are refused."""
    idx = np.sort(np.random.default_rng(0).choice(N, 300, replace=False))
    s = _sampler(2, 0, 4, indices=idx)
    order = np.concatenate([s.epoch_order(0), _sampler(2, 1, 4, indices=idx).epoch_order(0)])
    assert set(order) <= set(idx) and len(set(order)) == len(order) >= 300 - 8
    with pytest.raises(ValueError, match="shuffle_streams=6 is not a positive multiple of the world size 4"):
        _sampler(4, 0, 1, streams=6)
    with pytest.raises(ValueError, match="non-decreasing block numbers"):
        StreamSampler(np.arange(N), 2, 1, 0, 1, seed=0, groups=GROUPS[::-1])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _sampler(1, 0, 64, indices=np.arange(60))
    assert [default_streams(w) for w in (1, 2, 3, 4, 8, 16)] == [8, 8, 9, 8, 8, 16]


def test_each_block_decoded_once_per_epoch_per_rank(tmp_path):
    """Through a reader whose LRU holds (streams / W) · (window + 2) blocks, a rank of 2 decodes
    each of its blocks once per epoch, and the two ranks together decode each block of the cache
    once, but for the blocks shared at stream boundaries."""
    recs = synthetic_records(96, 60, 6, seed=12, min_len=10, max_len=10)  # 12 shards of 8, blocks of 3
    reader = _cache(tmp_path / "c", "parquet", recs)
    block_bytes = reader.read_block(0, 0).nbytes
    decoded = []
    for rank in range(2):
        r = type(reader)(reader.backend, reader.dir, reader.manifest, reader.shards,
                         max_cached_bytes=(4 // 2) * (2 + 2) * block_bytes)
        calls = []
        read = r.read_block
        r.read_block = lambda s, b: calls.append((s, b)) or read(s, b)
        s = StreamSampler(np.arange(96), 2, 1, rank, 2, seed=1, groups=r.block_ids(), regions=r.sample_shards(),
                          streams=4, window=2)
        for _ in range(s.steps_per_epoch):
            for micro in s.next_step():
                for i in micro:
                    r[int(i)]
        assert len(calls) == len(set(calls)), rank
        decoded.append(set(calls))
    n_blocks = sum(reader.num_blocks(s) for s in range(len(reader.shards)))
    assert len(decoded[0] & decoded[1]) <= 3 and len(decoded[0] | decoded[1]) == n_blocks


class _Dataset:  # a source without blocks (what data.train_dataset gives)
    def __len__(self):
        return N


class _Cache(_Dataset):
    def block_ids(self):
        return GROUPS

    def sample_shards(self):
        return REGIONS


def test_shuffle_choice_from_the_config():
    """``streams`` by default for a cache; a dataset or weighted draws are drawn with ``global``
    (said in the description), whether ``streams`` was the default or named (a resolved config
    names it); ``block`` needs a cache; the stream count must divide by the world size."""
    idx, w = np.arange(N), np.ones(N)
    args = (4, 1, 0, 2, 3)
    s, note = build_sampler(_data(), _Cache(), idx, None, *args)
    assert isinstance(s, StreamSampler) and s.streams == 8 and note == "streams (8 streams, window 16 blocks)"
    for data in (_data(), _data(shuffle="streams")):
        for src, weights, why in ((_Dataset(), None, "a dataset"), (_Cache(), w, "weighted draws")):
            s, note = build_sampler(data, src, idx, weights, *args)
            assert isinstance(s, StepSampler) and s.groups is None and note == f"global (streams cannot serve {why})"
    s, note = build_sampler(_data(shuffle="global"), _Cache(), idx, None, *args)
    assert isinstance(s, StepSampler) and note == "global"
    with pytest.raises(ConfigError, match="data.shuffle=block needs data.train_cache"):
        build_sampler(_data(shuffle="block"), _Dataset(), idx, None, *args)
    with pytest.raises(ConfigError, match="data.shuffle_streams=3 is not a multiple of the world size 2"):
        build_sampler(_data(shuffle_streams=3), _Cache(), idx, None, *args)
    s, note = build_sampler(_data(shuffle="block", shuffle_window=4), _Cache(), idx, None, *args)
    assert isinstance(s, StepSampler) and np.array_equal(s.groups, GROUPS) and note == "block (window 4)"
