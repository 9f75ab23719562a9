"""SIGKILL precompute-teacher at several points of closing a shard (1 and 2 ranks, both
backends), rerun it, and check the final cache holds exactly the samples of an
uninterrupted run, bit for bit."""
import numpy as np
import pytest
from conftest import precompute_config, run_cli, train_config, write_yaml

from pipeline.cache import open_cache, read_manifest

# (backend, ranks, kill points in order; each rerun is killed at the next point, then one clean run)
CASES = [
    ("parquet", 1, ["before_rename:0", "after_marker:1", "before_marker:0"]),
    ("zarr", 1, ["before_marker:0", "after_marker:0"]),
    ("parquet", 2, ["rank1:after_marker:0"]),
    ("zarr", 2, ["rank0:before_rename:1"]),
]


def _records(path):
    r = open_cache(path)
    r.validate()
    return {sid: r[r.index_of(sid)] for sid in r.sample_ids}


@pytest.mark.parametrize("backend,nproc,points", [
    pytest.param(*c, marks=[pytest.mark.slow] if c[1] == 2 else [])  # 2 ranks: .ci/run, not make test
    for c in CASES], ids=[f"{b}-{n}rank" for b, n, _ in CASES])
def test_killed_precompute_resumes_to_the_same_cache(assets, caches, tmp_path, backend, nproc, points):
    cache = tmp_path / "cache"
    cfg = write_yaml(tmp_path / "pre.yaml", precompute_config(assets, cache, **{"cache.backend": backend}))
    cmd = ["stages.precompute_teacher", "--config", str(cfg)]
    for point in points:
        res = run_cli(cmd, nproc=nproc, env={"KD_FAULT_KILL": point})
        assert res.returncode != 0, f"not killed at {point}: {res.stdout[-2000:]}"
        assert not read_manifest(cache).complete
        with pytest.raises(ValueError, match="incomplete"):
            open_cache(cache)
    res = run_cli(cmd, nproc=nproc)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "already cached" in res.stdout + res.stderr
    m = read_manifest(cache)
    assert m.complete and m.backend == backend
    got, want = _records(cache), _records(caches["train"])  # reference: uninterrupted 1-rank parquet run
    assert sorted(got) == sorted(want) and m.num_samples == len(want)
    for sid, rec in want.items():
        g = got[sid]
        for name in ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logprob"):
            np.testing.assert_array_equal(getattr(g, name), getattr(rec, name), err_msg=f"{sid} {name}")
        assert g.teacher_nll_sum == rec.teacher_nll_sum
    assert not list(cache.glob("*.tmp"))
    if backend == "zarr" and nproc == 1:  # train-student finds the backend in the manifest (eval cache: parquet)
        cfg = train_config(assets, {"train": cache, "validation": caches["validation"]}, tmp_path / "run", max_steps=3,
                           eval_steps=3)
        res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "train.yaml", cfg))])
        assert res.returncode == 0, res.stderr[-3000:]
        assert (tmp_path / "run" / "final" / "config.json").is_file()
