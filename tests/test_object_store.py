"""The teacher cache on an S3-compatible object store: moto's HTTP server on 127.0.0.1 (started
and stopped by the fixture; nothing else on the network is contacted)."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from pipeline.cache import open_cache
from tests.conftest import loopback_s3, precompute_config, run_cli, train_config, write_yaml

pytest.importorskip("moto")
pytest.importorskip("s3fs")

BUCKET = "kd-test"
FIELDS = ("input_ids", "loss_mask", "topk_ids", "topk_logprobs", "tail_logprob")


@pytest.fixture(scope="module")
def s3():
    """``s3://kd-test`` on a loopback moto server (:func:`tests.conftest.loopback_s3`)."""
    with loopback_s3(BUCKET) as url:
        yield url


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
    whole = open_cache(s3_cache, max_cached_bytes=1)  # every access decodes its block again
    whole.read_shards_whole()  # what the streams shuffle asks for: one GET per shard, blocks from memory
    _assert_same_records(open_cache(caches["train"]), whole)
    assert len(whole.backend._shared) == len(whole.shards)  # each shard fetched (and kept) once


@pytest.mark.slow  # make test skips it; .ci/run runs it
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


@pytest.mark.slow  # make test skips it; .ci/run runs it
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


# ------------------------------------------------------------------ store failures, by cause
def _one_line_error(res, *words: str) -> str:
    """The single stderr line of a failed stage (exit 2), holding every word of ``words``."""
    lines = [x for x in res.stderr.strip().splitlines() if x.strip()]
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the socket is: nothing listens there


def test_unreachable_endpoint_is_one_line_and_fast(s3, assets, caches, tmp_path, monkeypatch):
    """Nothing listens at the endpoint (a closed loopback port): every stage ends in one line
    naming the URL and the endpoint; check_access tries once (no backoff)."""
    import time

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", endpoint)
    cfg = write_yaml(tmp_path / "p.yaml", precompute_config(assets, f"{s3}/cache-down"))
    tcfg = write_yaml(tmp_path / "t.yaml", train_config(assets, caches, f"{s3}/run-down", max_steps=2))
    for args, url, limit in ((["stages.precompute_teacher", "--config", str(cfg)], f"{s3}/cache-down", 30),
                             (["stages.train_student", "--config", str(tcfg)], f"{s3}/run-down", 30),
                             (["stages.inspect_cache", f"{s3}/cache-down"], f"{s3}/cache-down", 60),
                             (["stages.inspect_losses", f"{s3}/run-down"], f"{s3}/run-down", 60)):
        t = time.monotonic()
        res = run_cli(args)
        line = _one_line_error(res, url, endpoint, "unreachable")
        assert time.monotonic() - t < limit, (args[0], time.monotonic() - t, line)


def test_refused_credentials_inspectors(s3, monkeypatch):
    """IAM enforcement on: the inspectors name the URL and the refused credentials (the code
    where the answer has a body: a HEAD request's 403 has none)."""
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    line = _one_line_error(run_cli(["stages.inspect_cache", f"{s3}/cache-denied"]), f"{s3}/cache-denied",
                           "refused the credentials")
    assert "403 Forbidden" in line or "InvalidAccessKeyId" in line, line
    _one_line_error(run_cli(["stages.inspect_losses", f"{s3}/run-denied"]), f"{s3}/run-denied",
                    "refused the credentials (InvalidAccessKeyId")


def test_missing_bucket_inspectors(s3):
    for args in (["stages.inspect_cache", "s3://no-such-bucket/cache"], ["stages.inspect_losses", "s3://no-such-bucket/run"]):
        _one_line_error(run_cli(args), args[1], "bucket 'no-such-bucket' does not exist")


def test_missing_object_is_one_line(s3, assets, caches, tmp_path):
    """A cache or run prefix with nothing there: the URL and "no such object/prefix"."""
    _one_line_error(run_cli(["stages.inspect_cache", f"{s3}/no-such-cache"]), f"{s3}/no-such-cache", "no such object")
    _one_line_error(run_cli(["stages.inspect_losses", f"{s3}/no-such-run"]), f"{s3}/no-such-run", "no such prefix")
    cfg = train_config(assets, caches, tmp_path / "run", max_steps=2)
    cfg["data"]["train_cache"] = f"{s3}/no-such-cache"
    res = run_cli(["stages.train_student", "--config", str(write_yaml(tmp_path / "t.yaml", cfg))])
    _one_line_error(res, f"{s3}/no-such-cache", "no such object")


def _throttle(monkeypatch) -> list:
    """Every S3 request of s3fs answers what botocore raises for a 503 SlowDown, through s3fs's
    own retry loop (moto cannot throttle); returns the list of attempts made."""
    import s3fs.core
    from botocore.exceptions import ClientError

    attempts: list = []

    async def call_s3(self, method, *args, **kwargs):
        async def slow_down(**_):
            attempts.append(method)
            raise ClientError({"Error": {"Code": "SlowDown", "Message": "Please reduce your request rate."},
                               "ResponseMetadata": {"HTTPStatusCode": 503}}, str(method))

        return await s3fs.core._error_wrapper(slow_down, retries=self.retries)

    monkeypatch.setattr(s3fs.core.S3FileSystem, "_call_s3", call_s3)
    return attempts


def test_throttling_is_one_line(s3, assets, caches, tmp_path, monkeypatch):
    """The store throttles every request (SlowDown) and s3fs's retries run out: the URL, the
    code and the number of attempts, exit 2."""
    attempts = _throttle(monkeypatch)
    tcfg = write_yaml(tmp_path / "t.yaml", train_config(assets, caches, f"{s3}/run-slow", max_steps=2))
    for args, url in ((["stages.inspect_cache", f"{s3}/cache-parquet"], f"{s3}/cache-parquet"),
                      (["stages.inspect_losses", f"{s3}/run-slow"], f"{s3}/run-slow"),
                      (["stages.train_student", "--config", str(tcfg)], f"{s3}/run-slow")):
        _one_line_error(run_cli(args), url, "throttling requests (SlowDown) after 5 attempts")
    assert len(attempts) >= 5


def test_throttled_shard_read_names_the_shard(s3_cache, monkeypatch):
    """A block read that the store throttles mid-run is a StoreError naming the shard's URL,
    not "shard unreadable" (a corrupt shard)."""
    from pipeline.storage import StoreError

    r = open_cache(s3_cache)
    _throttle(monkeypatch)
    with pytest.raises(StoreError, match=rf"^{s3_cache}/part-[^ ]*: the store is throttling requests \(SlowDown\) "
                                         r"after 5 attempts"):
        r.read_block(0, 0)


def test_store_write_failure_names_the_cause(s3, monkeypatch):
    """A write on the store inside ``writing`` (a refused PUT): a StorageError naming what, where
    and the store's cause; a local ENOSPC keeps its old message."""
    from pipeline.storage import Remote
    from pipeline.storage.errors import StorageError, writing

    _throttle(monkeypatch)
    with pytest.raises(StorageError, match=r"could not write the run summary s3://kd-test/run-w/summary.json: "
                                           r"the store is throttling requests \(SlowDown\) after 5 attempts"):
        with writing("the run summary", f"{s3}/run-w/summary.json"):
            Remote(f"{s3}/run-w").write_bytes("summary.json", b"{}")
    with pytest.raises(StorageError, match=r"No space left on device \(errno 28\); .*free space"):
        with writing("the run summary", "/tmp/x/summary.json"):
            raise OSError(28, "No space left on device")


@pytest.mark.parametrize("code,status,cause", [
    ("InvalidAccessKeyId", 403, "the store refused the credentials (InvalidAccessKeyId"),
    ("SignatureDoesNotMatch", 403, "the store refused the credentials (SignatureDoesNotMatch"),
    ("AccessDenied", 403, "the store refused the credentials (AccessDenied: access denied"),
    ("NoSuchBucket", 404, "bucket 'b' does not exist"),
    ("NoSuchKey", 404, "no such object"),
    ("SlowDown", 503, "the store is throttling requests (SlowDown) after 3 attempts"),
    ("ThrottlingException", 400, "the store is throttling requests (ThrottlingException)"),
    ("InternalError", 500, "the store failed the request (InternalError: boom)"),
])
def test_store_cause_of_client_errors(code, status, cause):
    """The classification of botocore's ClientError, raw or as s3fs translates it (an OSError
    subclass with the ClientError as its cause)."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    from pipeline.storage import store_cause, store_error

    raw = ClientError({"Error": {"Code": code, "Message": "boom"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                      "GetObject")
    for e in (raw, translate_boto_error(raw)):
        assert store_cause(e, "b", attempts=3).startswith(cause), (e, store_cause(e, "b", attempts=3))
    err = store_error(translate_boto_error(raw), "s3://b/x", attempts=3, bare=True)
    assert str(err).startswith(f"s3://b/x: {cause}") and isinstance(err, OSError)
    assert isinstance(err, FileNotFoundError) == (code == "NoSuchKey")


def test_store_cause_of_other_errors():
    from botocore.exceptions import EndpointConnectionError

    from pipeline.storage import store_cause

    e = EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/k?x=1")
    e.__context__ = ConnectionRefusedError(111, "Connect call failed")
    assert store_cause(e) == "the endpoint http://127.0.0.1:9 is unreachable (Connection refused)"
    assert store_cause(FileNotFoundError("b/k")) is None  # only at the request itself (bare)
    assert store_cause(FileNotFoundError("b/k"), bare=True) == "no such object"
    assert store_cause(OSError(28, "No space left on device"), bare=True) is None  # a local error
    assert store_cause(ValueError("x")) is None
    assert store_cause(ConnectionRefusedError(111, "x")) is None  # not a store client's (a process group...)
    assert store_cause(TimeoutError()) is None
