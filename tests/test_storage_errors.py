"""A full disk (ENOSPC) while writing a cache shard, a loss-log part or a checkpoint: one line
naming what was being written, exit code 2, nothing marked complete, what was complete before
intact, and a rerun that finishes with the same result as an uninterrupted run.

The error is injected where the libraries write the bytes (pyarrow's ``ParquetWriter``, zarr's
``LocalStore``, torch.distributed.checkpoint's file system), so the path from the library's
own exception to the user's line is what is tested.
"""
import errno
import re

import numpy as np
import pytest
import torch
from conftest import precompute_config, run_cli, train_config, write_yaml
from safetensors.torch import load_file

from pipeline.cache import open_cache, read_manifest
from pipeline.cache.shards import closed_shards
from pipeline.student.checkpoint import complete_checkpoints, verify_checkpoint


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _error_line(res, prog: str, *names) -> str:
    """Exit code 2; the last stderr line is the only error line, names ``names``, no traceback."""
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    assert errors == [lines[-1]] and lines[-1].startswith(f"{prog}: error: "), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    for name in ("No space left on device", *names):
        assert str(name) in lines[-1], lines[-1]
    return lines[-1]


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_full_disk_while_writing_a_shard(assets, caches, tmp_path, monkeypatch, backend):
    """The second shard of a 40-sample cache (16 per shard) hits ENOSPC: the first shard stays
    closed, the failed one leaves no file, the manifest is not complete; the rerun writes the
    rest and the cache equals the uninterrupted one record for record."""
    cache = tmp_path / "cache"
    cfg = write_yaml(tmp_path / "p.yaml", precompute_config(assets, cache, **{"cache.backend": backend}))
    second = "-00001"
    with monkeypatch.context() as m:
        if backend == "parquet":
            import pyarrow.parquet as pq

            orig = pq.ParquetWriter.write_table

            def write_table(self, table, *a, **k):
                if second in str(self.where):  # the file being written
                    _enospc()
                return orig(self, table, *a, **k)

            m.setattr(pq.ParquetWriter, "write_table", write_table)
        else:
            from zarr.storage import LocalStore

            orig = LocalStore.set

            async def set_(self, key, value):
                if second in str(self.root):
                    _enospc()
                return await orig(self, key, value)

            m.setattr(LocalStore, "set", set_)
        res = run_cli(["stages.precompute_teacher", "--config", str(cfg)])
    line = _error_line(res, "precompute-teacher", str(cache))
    assert re.search(rf"shard part-r00000-a\d+-00001\.{backend} ", line), line
    assert not read_manifest(cache).complete
    assert [re.sub(r"-a\d+-", "-a-", s.file) for s in closed_shards(cache)] == [f"part-r00000-a-00000.{backend}"]
    assert sorted(p.name for p in cache.glob("part-*")) == sorted(
        [closed_shards(cache)[0].file, closed_shards(cache)[0].file + ".done.json"])  # nothing of shard 1 left
    res = run_cli(["stages.precompute_teacher", "--config", str(cfg)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "16 already cached" in res.stdout + res.stderr
    got, want = open_cache(cache), open_cache(caches["train"])
    assert sorted(got.sample_ids) == sorted(want.sample_ids)
    for sid in want.sample_ids:
        a, b = got[got.index_of(sid)], want[want.index_of(sid)]
        for name in ("input_ids", "topk_ids", "topk_logprobs", "tail_logprob"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=f"{sid} {name}")


def _train(cfg) -> object:
    return run_cli(["stages.train_student", "--config", str(cfg)])


def test_full_disk_while_writing_a_checkpoint(assets, caches, tmp_path, monkeypatch):
    """ENOSPC inside torch.distributed.checkpoint while saving step 10: the error names the
    checkpoint, its temporary directory is gone, step 5 still verifies; the rerun resumes from
    step 5 and ends with the uninterrupted run's weights."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    over = dict(micro_batch_size=4, max_steps=15, save_steps=5, eval_steps=100)
    ref = tmp_path / "ref"
    assert _train(write_yaml(tmp_path / "ref.yaml", train_config(assets, caches, ref, **over))).returncode == 0
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "run.yaml", train_config(assets, caches, run, **over))
    orig = FileSystem.create_stream

    def create_stream(self, path, mode):
        if "step-00000010" in str(path) and "w" in mode:
            _enospc()
        return orig(self, path, mode)

    with monkeypatch.context() as m:
        m.setattr(FileSystem, "create_stream", create_stream)
        res = _train(cfg)
    _error_line(res, "train-student", "checkpoint", str(run / "checkpoints" / "step-00000010"))
    assert [p.name for p in complete_checkpoints(run)] == ["step-00000005"]
    assert verify_checkpoint(run / "checkpoints" / "step-00000005") is None
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / "final").exists()
    res = _train(cfg)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "step-00000005" in res.stdout
    a, b = load_file(ref / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=lambda msg: f"{name}: {msg}")


def test_full_disk_while_writing_a_loss_log(assets, caches, tmp_path, monkeypatch):
    """ENOSPC writing the loss-log part that the first checkpoint would cover: the error names
    the part, no checkpoint is marked complete and no export is written."""
    import pyarrow.parquet as pq

    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "run.yaml", train_config(assets, caches, run, micro_batch_size=4, max_steps=10,
                                                         save_steps=5, eval_steps=100))
    with monkeypatch.context() as m:
        m.setattr(pq.ParquetWriter, "write_table", _enospc)
        res = _train(cfg)
    _error_line(res, "train-student", "loss-log part", str(run / "loss_logs"))
    assert not complete_checkpoints(run) and not (run / "final").exists()
    assert not list(run.rglob("*.tmp"))
