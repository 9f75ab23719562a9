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
    """The fixture's train split, read from the corpus uploaded to ``s3://kd-test/corpus``
    (``save_to_disk`` layout), precomputed into ``s3://kd-test/cache-parquet`` (1 rank)."""
    from pipeline.storage import Remote

    d = tmp_path_factory.mktemp("s3cache")
    Remote(f"{s3}/corpus").put_dir(Path(assets["corpus"]), "")
    url = f"{s3}/cache-parquet"
    cfg = write_yaml(d / "p.yaml", precompute_config(assets, url, **{"dataset.path": f"{s3}/corpus"}))
    res = run_cli(["stages.precompute_teacher", "--config", str(cfg)])
    assert res.returncode == 0, res.stderr[-3000:]
    return url


def test_cache_on_s3_equals_local(s3_cache, caches):
    r = open_cache(s3_cache)
    assert r.manifest.complete and r.manifest.backend == "parquet"
    _assert_same_records(open_cache(caches["train"]), r)
    assert not Path("s3:").exists()  # the URL never became a local directory


def test_zarr_cache_on_s3_two_ranks(s3, s3_cache, assets, caches, tmp_path):
    """2 ranks read the corpus from the store and write a zarr cache there; train-student with
    every path on the store (train and eval cache, run directory) equals the same run from a
    local copy of that cache bit for bit; inspect-losses reads the run from its URL."""
    from pipeline.losslog.reader import load_loss_logs

    url = f"{s3}/cache-zarr-2"
    cfg = write_yaml(tmp_path / "p.yaml", precompute_config(assets, url, **{"cache.backend": "zarr",
                                                                            "dataset.path": f"{s3}/corpus"}))
    res = run_cli(["stages.precompute_teacher", "--config", str(cfg)], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    r = open_cache(url)
    assert r.manifest.backend == "zarr" and {s.rank for s in r.shards} == {0, 1}
    _assert_same_records(open_cache(caches["train"]), r)
    r.validate()  # every remote shard's sha256 equals the one recorded from the staged bytes
    res = run_cli(["stages.inspect_cache", url])
    assert res.returncode == 0 and "40" in res.stdout, res.stderr[-2000:]
    # train from the zarr cache on the store into a run directory there, and from a local copy of
    # the same cache into a local directory: the same weights bit for bit (the sample order is the
    # cache's storage order, which depends on the world size that wrote it: hence the copy)
    from pipeline.storage import Remote

    local_cache = tmp_path / "zarr-copy"
    Remote(url).download_dir("", local_cache)
    for out, cache in ((f"{s3}/run-zarr", url), (str(tmp_path / "run-zarr"), str(local_cache))):
        cfg = train_config(assets, caches, out, max_steps=6, eval_steps=3, save_steps=2)
        cfg["data"]["train_cache"] = cfg["data"]["eval_cache"] = cache
        res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
        assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_weights(_weights(str(tmp_path / "run-zarr")), _weights(f"{s3}/run-zarr"))
    a, b = load_loss_logs(str(tmp_path / "run-zarr")), load_loss_logs(f"{s3}/run-zarr")
    key = [(k, "ascending") for k in ("split", "step", "sample_id")]
    assert a.num_rows == b.num_rows > 0 and a.sort_by(key)["loss_sum"].equals(b.sort_by(key)["loss_sum"])
    res = run_cli(["stages.inspect_losses", f"{s3}/run-zarr"])
    assert res.returncode == 0 and f"{a.num_rows} rows" in res.stdout, res.stderr[-2000:]


def _weights(run_dir: str) -> dict:
    """``final/model.safetensors`` of a local or an s3 run directory, as numpy arrays."""
    from safetensors.numpy import load

    if run_dir.startswith("s3://"):
        from pipeline.storage import Remote

        return load(Remote(run_dir).read_bytes("final/model.safetensors"))
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def local_run(assets, caches, tmp_path_factory) -> str:
    """The reference: 6 steps from the local cache into a local run directory (1 rank)."""
    out = tmp_path_factory.mktemp("local-run") / "run"
    cfg = train_config(assets, caches, out, max_steps=6, eval_steps=3, save_steps=2)
    res = run_cli(["stages.train_student", "--config", str(write_yaml(out.parent / "t.yaml", cfg))])
    assert res.returncode == 0, res.stderr[-3000:]
    return str(out)


def test_train_everything_on_s3_equals_local(s3, s3_cache, assets, caches, local_run, tmp_path):
    """Cache and run directory on the store: the same weights and loss-log rows as the local
    run; checkpoints complete (checksums last), exports, metrics and summary on the store;
    inspect-losses reads the run from its URL; no credential in config.yaml."""
    import pyarrow.compute as pc

    from pipeline.student.checkpoint import complete_checkpoints, verify_checkpoint
    from pipeline.losslog.reader import load_loss_logs
    from pipeline.storage import Remote

    out = f"{s3}/run-1rank"
    cfg = train_config(assets, caches, out, max_steps=6, eval_steps=3, save_steps=2)
    cfg["data"]["train_cache"] = s3_cache
    cfg["storage_options"] = {"s3": {"key": "testing", "secret": "testing"}}
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
    assert res.returncode == 0, res.stderr[-3000:]
    _assert_same_weights(_weights(local_run), _weights(out))
    names = set(Remote(out).names())
    assert {"config.yaml", "metrics.jsonl", "summary.json", "best", "final", "checkpoints", "loss_logs"} <= names
    assert "testing" not in Remote(out).read_bytes("config.yaml").decode()  # credentials redacted
    ckpts = complete_checkpoints(out)
    assert [c.rsplit("/", 1)[1] for c in ckpts] == ["step-00000004", "step-00000006"]  # save_total_limit 2
    assert all(verify_checkpoint(c) is None for c in ckpts)
    local_lines = (Path(local_run) / "metrics.jsonl").read_text().splitlines()
    assert len(Remote(out).read_bytes("metrics.jsonl").decode().splitlines()) == len(local_lines)
    a, b = load_loss_logs(local_run), load_loss_logs(out)
    assert a.num_rows == b.num_rows > 0
    key = ["split", "step", "sample_id"]
    a, b = a.sort_by([(k, "ascending") for k in key]), b.sort_by([(k, "ascending") for k in key])
    for col in ("sample_id", "step", "loss_sum", "kl_sum"):
        assert a[col].equals(b[col]), col
    assert pc.sum(b["n_tokens"]).as_py() == pc.sum(a["n_tokens"]).as_py()
    res = run_cli(["stages.inspect_losses", out])
    assert res.returncode == 0 and f"{a.num_rows} rows" in res.stdout, res.stderr[-2000:]


def test_kill_during_checkpoint_upload_two_ranks(s3, s3_cache, assets, caches, tmp_path):
    """2 ranks, run directory on the store: SIGKILL of rank 0 after the second checkpoint's
    shards and trainer.pt but before its checksums; the rerun skips that incomplete prefix,
    resumes from step 2 and ends with the weights and loss-log rows of an uninterrupted 2-rank
    run on a local directory."""
    from pipeline.losslog.reader import load_loss_logs

    def cfg_for(out: str, name: str) -> str:
        cfg = train_config(assets, caches, out, max_steps=6, eval_steps=3, save_steps=2, micro_batch_size=1)
        cfg["data"]["train_cache"] = s3_cache
        return str(write_yaml(tmp_path / name, cfg))

    ref = str(tmp_path / "ref")
    res = run_cli(["stages.train_student", "--config", cfg_for(ref, "ref.yaml")], nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    out = f"{s3}/run-kill"
    args = ["stages.train_student", "--config", cfg_for(out, "kill.yaml")]
    res = run_cli(args, nproc=2, env={"KD_FAULT_KILL": "rank0:checkpoint_before_checksums:2"})
    assert res.returncode != 0
    from pipeline.storage import Remote

    assert Remote(out).isfile("checkpoints/step-00000004/trainer.pt")
    assert not Remote(out).isfile("checkpoints/step-00000004/checksums.json")
    assert not Remote(out).exists("final")
    res = run_cli(args, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "skipping" in res.stderr and "step-00000004" in res.stderr and "resumed from" in res.stdout
    assert "at step 2" in res.stdout
    _assert_same_weights(_weights(ref), _weights(out))
    a, b = load_loss_logs(ref, split="train"), load_loss_logs(out, split="train")
    assert a.num_rows == b.num_rows and set(b["rank"].to_pylist()) == {0, 1}  # no row logged twice


@pytest.mark.parametrize("point,backend", [("before_rename", "parquet"), ("before_marker", "parquet"),
                                           ("mid_upload", "zarr")])
def test_kill_during_shard_upload_then_resume(s3, assets, caches, tmp_path, point, backend):
    """SIGKILL before a shard's upload / between two objects of a zarr shard's upload / after its
    objects but before its marker: the rerun deletes the unmarked objects, keeps the closed
    shards and ends with the same records."""
    url = f"{s3}/cache-kill-{point}-{backend}"
    cfg = write_yaml(tmp_path / "p.yaml", precompute_config(assets, url, **{"cache.writer_queue_shards": 0,
                                                                            "cache.backend": backend}))
    res = run_cli(["stages.precompute_teacher", "--config", str(cfg)], env={"KD_FAULT_KILL": f"{point}:1"})
    assert res.returncode != 0
    from pipeline.storage import Remote

    names = Remote(url).names()
    marked = [n for n in names if n.endswith(".done.json")]
    assert len(marked) == 1 and json.loads(Remote(url).read_bytes("manifest.json"))["complete"] is False
    assert sum(n.startswith("part-") and not n.endswith(".done.json") for n in names) == (1 if point == "before_rename" else 2)
    if point == "mid_upload":  # the killed shard's prefix holds part of its objects, and no marker
        shard = sorted(n for n in names if n.startswith("part-") and not n.endswith(".done.json"))[-1]
        staged = len(Remote(url).files(marked[0][: -len(".done.json")]))
        assert 1 <= len(Remote(url).files(shard)) < staged, (shard, staged)
    res = run_cli(["stages.precompute_teacher", "--config", str(cfg)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "16 already cached" in res.stdout
    r = open_cache(url)
    _assert_same_records(open_cache(caches["train"]), r)
    assert len([n for n in Remote(url).names() if n.startswith("part-") and not n.endswith(".done.json")]) == len(r.shards)


def test_missing_bucket_is_one_line(s3, assets, caches, tmp_path):
    cfg = write_yaml(tmp_path / "p.yaml", precompute_config(assets, "s3://no-such-bucket/cache"))
    tcfg = write_yaml(tmp_path / "t.yaml", train_config(assets, caches, "s3://no-such-bucket/run", max_steps=2))
    for args, url in ((["stages.precompute_teacher", "--config", str(cfg)], "s3://no-such-bucket/cache"),
                      (["stages.train_student", "--config", str(tcfg)], "s3://no-such-bucket/run")):
        res = run_cli(args)
        assert res.returncode != 0
        lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
        assert url in lines[-1] and "does not exist" in lines[-1], res.stderr[-2000:]
        assert "Traceback" not in res.stderr


def test_wrong_credentials_is_one_line(s3, assets, caches, tmp_path, monkeypatch):
    """The server checks credentials (moto's IAM enforcement on): an unknown access key ends
    precompute-teacher (cache.dir) and train-student (output_dir) with one line naming the URL."""
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    url = f"{s3}/cache-denied"
    cfg = write_yaml(tmp_path / "p.yaml", precompute_config(assets, url))
    tcfg = train_config(assets, caches, f"{s3}/run-denied", max_steps=2)
    for args in (["stages.precompute_teacher", "--config", str(cfg)],
                 ["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", tcfg))]):
        res = run_cli(args)
        assert res.returncode != 0
        lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
        assert "Traceback" not in res.stderr, res.stderr[-2000:]
        assert f"{s3}/" in lines[-1] and ("denied" in lines[-1].lower() or "access key" in lines[-1].lower()), lines[-1]


def test_url_where_a_local_path_is_needed_is_refused(s3, assets, caches, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = train_config(assets, caches, tmp_path / "run")
    cfg["data"]["tokenizer"] = f"{s3}/tokenizer"
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
    assert res.returncode != 0 and "data.tokenizer" in res.stderr and "is a URL" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "s3:").exists()
