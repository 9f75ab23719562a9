"""Shared fixtures: a tiny corpus from the standard library, a tokenizer trained on it, a tiny
random Llama teacher and student saved as HF directories. Nothing is downloaded."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """Paths of the tiny fixture: corpus (DatasetDict dir), tokenizer, teacher, student config."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.data.demo_corpus import build_corpus, llama_config, train_tokenizer

    d = tmp_path_factory.mktemp("assets")
    dd = build_corpus(d / "corpus", max_chars=300, heldout_fraction=0.2, limit_files=12)
    tok = train_tokenizer(dd["train"]["text"][:], 320, d / "tokenizer")
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(llama_config(len(tok), 32, 2, 4, 2, 64, bos_token_id=tok.bos_token_id,
                                                            eos_token_id=tok.eos_token_id))
    teacher.save_pretrained(d / "teacher")
    tok.save_pretrained(d / "teacher")
    llama_config(len(tok), 16, 2, 2, 1, 32).save_pretrained(d / "student")
    return {"dir": d, "corpus": str(d / "corpus"), "tokenizer": str(d / "tokenizer"), "teacher": str(d / "teacher"),
            "student": str(d / "student"), "vocab": len(tok)}


def precompute_config(assets: dict, cache_dir: Path, split: str = "train", **over) -> dict:
    cfg = {"teachers": [{"path": assets["teacher"]}],
           "dataset": {"path": assets["corpus"], "split": split, "id_field": "id", "max_length": 48, "num_samples": 40},
           "cache": {"dir": str(cache_dir), "k": 8, "samples_per_shard": 16, "row_group_size": 4},
           "batch_size": 4, "window_rows": 16, "device": "cpu",
           "teacher_check": "warn"}  # the fixture teachers are random: perplexity ≈ V
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(args: list[str], nproc: int = 1, timeout: int = 300, env: dict | None = None,
            subprocess_: bool = False) -> subprocess.CompletedProcess:
    """Run a stage module's ``main`` and return its exit code and output.

    Under ``torchrun --nproc_per_node`` when ``nproc > 1``; in a subprocess when ``env`` adds
    environment variables (fault injection) or ``subprocess_`` is set; otherwise in this
    process (one thread, as the subprocesses run), which saves the ~5 s of importing torch and
    transformers per run. Both forms return a ``CompletedProcess`` with stdout and stderr."""
    if nproc == 1 and env is None and not subprocess_:
        return _run_in_process(args)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), **(env or {})}
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", *args]
    else:
        cmd = [sys.executable, "-m", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _run_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` as a call of ``MODULE.main(ARGS)`` in this process, with one
    torch thread and stdout/stderr captured."""
    import importlib
    import io

    import torch

    out, err = io.StringIO(), io.StringIO()
    threads, saved_env = torch.get_num_threads(), os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "disabled"
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = importlib.import_module(args[0]).main(list(args[1:]))
            except SystemExit as e:  # argparse errors and --help
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        torch.set_num_threads(threads)
        if saved_env is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = saved_env
    return subprocess.CompletedProcess(args, code or 0, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def caches(assets, tmp_path_factory) -> dict:
    """Complete 1-rank teacher caches of the fixture's train and validation splits."""
    d = tmp_path_factory.mktemp("caches")
    out = {}
    for split in ("train", "validation"):
        cfg = write_yaml(d / f"pre-{split}.yaml", precompute_config(assets, d / split, split=split))
        res = run_cli(["stages.precompute_teacher", "--config", str(cfg)])
        assert res.returncode == 0, res.stderr[-3000:]
        out[split] = d / split
    out["dir"] = d
    return out


def train_config(assets, caches, out_dir, **over) -> dict:
    """A train-student config over the fixture caches; ``over`` replaces top-level keys."""
    cfg = {"output_dir": str(out_dir), "student": {"path": assets["student"]},
           "data": {"train_cache": str(caches["train"]), "eval_cache": str(caches["validation"])},
           "micro_batch_size": 2, "grad_accum_steps": 1, "max_steps": 10, "eval_steps": 5, "log_steps": 1,
           "device": "cpu", "optim": {"warmup_steps": 2}}
    cfg.update(over)
    return cfg


@contextlib.contextmanager
def loopback_s3(bucket: str):
    """``s3://<bucket>`` on a moto server on 127.0.0.1 (a free port), started here and stopped on
    exit; the endpoint and fake credentials go to the environment, where fsspec
    (``FSSPEC_S3_ENDPOINT_URL``) and stage subprocesses find them, and are restored after."""
    import socket

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
        boto3.client("s3", endpoint_url=env["FSSPEC_S3_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
        yield f"s3://{bucket}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
