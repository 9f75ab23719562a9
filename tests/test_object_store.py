"""The teacher cache on an S3-compatible object store: moto's HTTP server on 127.0.0.1 (started
and stopped by the fixture; nothing else on the network is contacted)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from pipeline.cache import open_cache
from tests.conftest import precompute_config, run_cli, train_config, write_yaml

pytest.importorskip("moto")
pytest.importorskip("s3fs")

BUCKET = "kd-test"
FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logprob")


@pytest.fixture(scope="module")
def s3():
    """``s3://kd-test`` on a loopback moto server; the endpoint and (fake) credentials go to the
    environment, where fsspec (``FSSPEC_S3_ENDPOINT_URL``) and the stage subprocesses find them."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        boto3.client("s3", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def _assert_same_records(a, b) -> None:
    assert sorted(a.sample_ids) == sorted(b.sample_ids)
    for sid in a.sample_ids:
        x, y = a[a.index_of(sid)], b[b.index_of(sid)]
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f), err_msg=f"{sid} {f}")


@pytest.fixture(scope="module")
def s3_cache(s3, assets, tmp_path_factory) -> str:
    """The fixture's train split precomputed into ``s3://kd-test/cache-parquet`` (1 rank)."""
    d = tmp_path_factory.mktemp("s3cache")
    url = f"{s3}/cache-parquet"
    cfg = write_yaml(d / "p.yaml", precompute_config(assets, url))
    res = run_cli(["stages.precompute_teacher", "--config", str(cfg)])
    assert res.returncode == 0, res.stderr[-3000:]
    return url


def test_cache_on_s3_equals_local(s3_cache, caches):
    r = open_cache(s3_cache)
    assert r.manifest.complete and r.manifest.backend == "parquet"
    _assert_same_records(open_cache(caches["train"]), r)
    assert not Path("s3:").exists()  # the URL never became a local directory


def test_zarr_cache_on_s3_two_ranks(s3, assets, caches, tmp_path):
    url = f"{s3}/cache-zarr-2"
    cfg = write_yaml(tmp_path / "p.yaml", precompute_config(assets, url, **{"cache.backend": "zarr"}))
    res = run_cli(["stages.precompute_teacher", "--config", str(cfg)], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    r = open_cache(url)
    assert r.manifest.backend == "zarr" and {s.rank for s in r.shards} == {0, 1}
    _assert_same_records(open_cache(caches["train"]), r)
    r.validate()  # every remote shard's sha256 equals the one recorded from the staged bytes
    res = run_cli(["stages.inspect_cache", url])
    assert res.returncode == 0 and "40" in res.stdout, res.stderr[-2000:]


def test_train_from_s3_cache_equals_local(s3_cache, assets, caches, tmp_path):
    outs = {}
    for where, cache in (("local", str(caches["train"])), ("s3", s3_cache)):
        out = tmp_path / where
        cfg = train_config(assets, caches, out, max_steps=6, eval_steps=3)
        cfg["data"]["train_cache"] = cache
        res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / f"{where}.yaml", cfg))])
        assert res.returncode == 0, res.stderr[-3000:]
        outs[where] = load_file(str(out / "final" / "model.safetensors"))
    assert outs["local"].keys() == outs["s3"].keys()
    for name in outs["local"]:
        np.testing.assert_array_equal(outs["local"][name], outs["s3"][name], err_msg=name)


@pytest.mark.parametrize("point", ["before_rename", "before_marker"])
def test_kill_during_shard_upload_then_resume(s3, assets, caches, tmp_path, point):
    """SIGKILL before a shard's upload / after its objects but before its marker: the rerun
    deletes the unmarked objects, keeps the closed shards and ends with the same records."""
    url = f"{s3}/cache-kill-{point}"
    cfg = write_yaml(tmp_path / "p.yaml", precompute_config(assets, url, **{"cache.writer_queue_shards": 0}))
    res = run_cli(["stages.precompute_teacher", "--config", str(cfg)], env={"KD_FAULT_KILL": f"{point}:1"})
    assert res.returncode != 0
    from pipeline.storage import Remote

    names = Remote(url).names()
    marked = [n for n in names if n.endswith(".done.json")]
    assert len(marked) == 1 and json.loads(Remote(url).read_bytes("manifest.json"))["complete"] is False
    assert sum(n.startswith("part-") and not n.endswith(".done.json") for n in names) == (2 if point == "before_marker" else 1)
    res = run_cli(["stages.precompute_teacher", "--config", str(cfg)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "16 already cached" in res.stdout
    r = open_cache(url)
    _assert_same_records(open_cache(caches["train"]), r)
    assert len([n for n in Remote(url).names() if n.startswith("part-") and not n.endswith(".done.json")]) == len(r.shards)


def test_missing_bucket_is_one_line(s3, assets, tmp_path):
    cfg = write_yaml(tmp_path / "p.yaml", precompute_config(assets, "s3://no-such-bucket/cache"))
    res = run_cli(["stages.precompute_teacher", "--config", str(cfg)])
    assert res.returncode != 0
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert "s3://no-such-bucket/cache" in lines[-1] and "does not exist" in lines[-1], res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_url_where_a_local_path_is_needed_is_refused(s3, assets, caches, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = train_config(assets, caches, f"{s3}/run")
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
    assert res.returncode != 0 and "output_dir" in res.stderr and "is a URL" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "s3:").exists()
