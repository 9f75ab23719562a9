"""train-student from a teacher cache on an S3-compatible store vs the same cache on local disk.

The store is moto's HTTP server (``moto_server``) in its own process on 127.0.0.1; the cache is
written once to a local directory and once to ``s3://kd-bench/cache`` with the same records
(``bench/student_step.py``'s synthetic top-k targets, k = 64, q8 values, delta ids). Each round
runs one epoch of train-student (same config, same seed) from each, alternating which goes
first, in this process, and reads ``tokens_per_second`` from ``summary.json``. Bytes fetched
from the store are counted in s3fs (``S3File._fetch_range`` and ``S3FileSystem._cat_file``: the
ranged reads of parquet row groups, the indexes, markers and the manifest).

Goals (issue "caches on object storage"): tokens/s from the store ≥ 0.95× local disk (the
prefetcher hides the store); bytes fetched per epoch ≤ 1.2× the cache's size.

Run (from the repository root; about 3 minutes on 2 CPU cores)::

    OMP_NUM_THREADS=2 .venv/bin/python bench/object_store_bench.py [--rounds 3] [--samples 1024]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

FETCHED = {"bytes": 0, "requests": 0}


def count_s3_reads() -> None:
    """Count the bytes s3fs fetches (ranged GETs of files, whole-object reads)."""
    import s3fs.core as core

    fetch, cat = core.S3File._fetch_range, core.S3FileSystem._cat_file

    def fetch_range(self, start, end):
        out = fetch(self, start, end)
        FETCHED["bytes"] += len(out)
        FETCHED["requests"] += 1
        return out

    async def cat_file(self, path, version_id=None, start=None, end=None, **kw):
        out = await cat(self, path, version_id=version_id, start=start, end=end, **kw)
        FETCHED["bytes"] += len(out)
        FETCHED["requests"] += 1
        return out

    core.S3File._fetch_range, core.S3FileSystem._cat_file = fetch_range, cat_file


def start_store() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      FSSPEC_S3_ENDPOINT_URL=url)
    import boto3

    for _ in range(100):
        try:
            boto3.client("s3", endpoint_url=url).create_bucket(Bucket="kd-bench")
            return proc, url
        except Exception:  # noqa: BLE001 — the server is still starting
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def train_once(cfg: dict, work: Path, name: str) -> dict:
    import yaml

    from stages import train_student

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = {**cfg, "output_dir": str(out)}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = train_student.main(["--config", str(path)])
    if code:
        raise SystemExit(f"train-student ({name}) exited {code}")
    return json.loads((out / "summary.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--length", type=int, default=256, help="tokens per sample")
    ap.add_argument("--workers", type=int, default=None, help="data.num_workers of both runs (default: the config default)")
    ap.add_argument("--prefetch", type=int, default=None, help="data.prefetch_steps of both runs")
    args = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from pipeline.data.demo_corpus import llama_config
    from pipeline.cache import cache_bytes
    from student_step import write_cache

    proc, endpoint = start_store()
    work = Path(tempfile.mkdtemp(prefix="kd-s3bench-"))
    try:
        V = 512
        rng = np.random.default_rng(0)
        tokens = [rng.integers(0, V, args.length).tolist() for _ in range(args.samples)]
        local = write_cache(work / "cache", tokens, V)
        remote = "s3://kd-bench/cache"
        write_cache(remote, tokens, V)  # type: ignore[arg-type]
        size = cache_bytes(local)
        assert cache_bytes(remote) == size
        llama_config(V, 64, 2, 4, 2, 172).save_pretrained(work / "student")
        (work / "tok").mkdir()
        base = {"student": {"path": str(work / "student")}, "micro_batch_size": 8, "grad_accum_steps": 1, "epochs": 1,
                "eval_steps": 10**6, "log_steps": 10**6, "device": "cpu", "seed": 0,
                "loss": {"alpha": 0.5, "temperature": 1.0}}
        count_s3_reads()
        runs: dict[str, list[dict]] = {"local": [], "s3": []}
        for r in range(args.rounds):
            for where in (("local", "s3") if r % 2 == 0 else ("s3", "local")):
                cache = str(local) if where == "local" else remote
                FETCHED.update(bytes=0, requests=0)
                data = {"train_cache": cache, "tokenizer": str(work / "tok")}
                data.update({k: v for k, v in (("num_workers", args.workers), ("prefetch_steps", args.prefetch)) if v is not None})
                s = train_once({**base, "data": data}, work, where)
                s["fetched"] = dict(FETCHED)
                runs[where].append(s)
                print(f"round {r} {where:5s}: {s['tokens_per_second']:,.0f} tok/s"
                      + (f", fetched {s['fetched']['bytes'] / 2**20:.2f} MiB in {s['fetched']['requests']} requests"
                         if where == "s3" else ""), flush=True)
        med = {w: statistics.median(x["tokens_per_second"] for x in v) for w, v in runs.items()}
        ratios = [a["tokens_per_second"] / b["tokens_per_second"] for a, b in zip(runs["s3"], runs["local"])]
        fetched = statistics.median(x["fetched"]["bytes"] for x in runs["s3"])
        print(f"\ncache: {args.samples} samples x {args.length} tokens, k=64, V={V}: {size / 2**20:.2f} MiB in the store")
        print(f"tokens/s  local {med['local']:,.0f}  s3 {med['s3']:,.0f}  ratio s3/local {med['s3'] / med['local']:.2f} "
              f"(per round {', '.join(f'{x:.2f}' for x in ratios)})  [goal >= 0.95]")
        print(f"bytes fetched per epoch: {fetched / 2**20:.2f} MiB = {fetched / size:.2f}x the cache  [goal <= 1.2]")
        w0 = {k: np.asarray(v) for k, v in _weights(work / "local").items()}
        w1 = _weights(work / "s3")
        same = all(np.array_equal(w0[k], w1[k]) for k in w0)
        print(f"final weights from s3 == from local disk: {same}")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _weights(run: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(run / "final" / "model.safetensors"))


if __name__ == "__main__":
    raise SystemExit(main())
