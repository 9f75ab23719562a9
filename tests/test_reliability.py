"""Every failure is one clear line and never a lost run.

Bad inputs (data files, cache paths, model files, a corrupt checkpoint) end with exit code 2
and exactly one stderr line naming the item, with nothing marked complete and nothing already
written changed; a run whose newest checkpoint is corrupt resumes from the previous one and
ends with an uninterrupted run's weights; progress in a log file is plain lines (no ``\\r``);
``--help`` lists every flag of every console script.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest
import torch
from conftest import ROOT, precompute_config, train_config as _train_cfg, write_yaml
from safetensors.torch import load_file

from pipeline.cache import read_manifest
from pipeline.student.checkpoint import complete_checkpoints, resolve_resume, save_checkpoint, verify_checkpoint


def _one_line_error(main, argv, capfd, *names) -> str:
    """Run ``main(argv)`` in-process; assert exit 2 and one stderr line containing ``names``."""
    code = main([str(a) for a in argv])
    err = capfd.readouterr().err
    assert code == 2, err[-2000:]
    assert err.endswith("\n") and err.count("\n") == 1, err[-2000:]
    for name in names:
        assert str(name) in err, err
    return err


def _truncated_copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    return dst


def test_precompute_bad_inputs(assets, caches, tmp_path, capfd):
    from stages.precompute_teacher import main as pre

    cfg = write_yaml(tmp_path / "p.yaml", precompute_config(assets, tmp_path / "unused"))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "bad.jsonl").write_text('{"text": "a b c"}\n{"text": "d e f"}\n{"text": "g h\n{"text": "i"}\n')
    (tmp_path / "bad.txt").write_bytes(b"first line\nsecond \xff\xfe line\n")
    (tmp_path / "bad.csv").write_text('text,id\n"unterminated,1\nb,2\n')
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    data_cases = [("empty.jsonl", ["empty.jsonl", "0 bytes"]), ("bad.jsonl", ["bad.jsonl line 3", "invalid JSON"]),
                  ("bad.txt", ["bad.txt line 2", "byte offset 18", "UTF-8"]), ("bad.csv", ["bad.csv"]),
                  ("bad.parquet", ["bad.parquet", "parquet"])]
    before = read_manifest(caches["train"]).model_dump()
    for i, (name, expect) in enumerate(data_cases):
        out = tmp_path / f"c{i}"
        _one_line_error(pre, ["--config", cfg, f"dataset.path={tmp_path / name}", "dataset.id_field=null",
                              f"cache.dir={out}"], capfd, *expect)
        assert not out.exists()  # nothing written, so nothing marked complete

    broken = _truncated_copy(assets["teacher"], tmp_path / "truncated-teacher")
    _one_line_error(pre, ["--config", cfg, f"teachers=[{{path: {broken}}}]", f"cache.dir={tmp_path / 'c-t'}"],
                    capfd, broken / "model.safetensors", "truncated")
    badcfg = shutil.copytree(assets["teacher"], tmp_path / "badcfg-teacher")
    (badcfg / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": }\n')
    _one_line_error(pre, ["--config", cfg, f"teachers=[{{path: {badcfg}}}]", f"cache.dir={tmp_path / 'c-c'}"],
                    capfd, badcfg / "config.json", "line 2")
    assert not (tmp_path / "c-t").exists() and not (tmp_path / "c-c").exists()

    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    for extra in ([], ["cache.overwrite=true"]):  # a file is never removed, not even with overwrite
        _one_line_error(pre, ["--config", cfg, f"cache.dir={a_file}", *extra], capfd, a_file, "file")
        assert a_file.read_text() == "keep me"
    assert read_manifest(caches["train"]).model_dump() == before  # a complete cache elsewhere is unchanged


def test_train_bad_inputs(assets, caches, tmp_path, capfd):
    from stages.train_student import main as train

    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "t.yaml", _train_cfg(assets, caches, run))
    a_file = tmp_path / "a-file"
    a_file.write_text("not a cache")
    _one_line_error(train, ["--config", cfg, f"data.train_cache={a_file}"], capfd, a_file)
    broken = _truncated_copy(assets["teacher"], tmp_path / "truncated-student")
    _one_line_error(train, ["--config", cfg, f"student.path={broken}", "student.init=pretrained"], capfd,
                    broken / "model.safetensors")
    badcfg = tmp_path / "badcfg-student"
    shutil.copytree(assets["student"], badcfg)
    (badcfg / "config.json").write_text("{oops")
    _one_line_error(train, ["--config", cfg, f"student.path={badcfg}"], capfd, badcfg / "config.json", "line 1")
    assert not run.exists() and a_file.read_text() == "not a cache"


def test_internal_error_is_one_line_and_debug_reraises(assets, caches, tmp_path, capfd, monkeypatch):
    import pipeline.student.loop
    from stages.train_student import main as train

    def boom(cfg, info):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(pipeline.student.loop, "run", boom)
    cfg = write_yaml(tmp_path / "t.yaml", _train_cfg(assets, caches, tmp_path / "run"))
    assert train(["--config", str(cfg)]) == 1
    err = capfd.readouterr().err
    assert err == ("train-student: internal error: RuntimeError: something broke / second line "
                   "(rerun with KD_DEBUG=1 for the traceback)\n")
    monkeypatch.setenv("KD_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something broke"):
        train(["--config", str(cfg)])


def test_rotation_keeps_the_checkpoint_just_written(tmp_path, capfd):
    """A stale checkpoint of a later step (a corrupt one the resume skipped) never pushes the
    newest verified checkpoint out of ``save_total_limit``."""
    stale = tmp_path / "checkpoints" / "step-00000009"
    stale.mkdir(parents=True)
    (stale / "trainer.pt").write_bytes(b"garbage")
    assert "checksums.json" in verify_checkpoint(stale)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (3, 5):
        save_checkpoint(tmp_path, step, model, opt, sched, {"step": step}, rank=0, keep=1)
    names = [p.name for p in complete_checkpoints(tmp_path)]
    assert names == ["step-00000005", "step-00000009"]
    assert verify_checkpoint(tmp_path / "checkpoints" / "step-00000005") is None
    assert resolve_resume(tmp_path, "auto") == tmp_path / "checkpoints" / "step-00000005"
    err = capfd.readouterr().err
    assert "skipping" in err and "step-00000009" in err


def _popen(cfg_path, err_file, extra=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT),
           "KD_PROGRESS_EVERY_S": "0"}  # a plain progress line at every step
    return subprocess.Popen([sys.executable, "-m", "stages.train_student", "--config", str(cfg_path), *extra], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=open(err_file, "w"), text=True,
                            start_new_session=True)


def _train_rows(run_dir):
    t = pads.dataset(run_dir / "loss_logs", format="parquet", partitioning="hive").to_table().to_pandas()
    return sorted(zip(t["split"], t["step"], t["sample_id"]))


def _check_plain_log(err_file: Path) -> str:
    text = err_file.read_text()
    assert "\r" not in text
    assert re.search(r"^train: \d+/20 step \(\d+%\), .* loss \d", text, re.M), text[-2000:]
    return text


def test_corrupt_newest_checkpoint_is_skipped_and_logs_are_plain(assets, caches, tmp_path, capfd, monkeypatch):
    """SIGKILL after step 15's checkpoint, truncate its ``.distcp``: ``resume: PATH`` to it is
    refused; ``resume: auto`` warns, resumes from step 10 and ends with the uninterrupted run's
    weights and loss-log rows. The logs (stderr to a file) are plain lines."""
    from stages.train_student import main as train

    over = dict(micro_batch_size=4, max_steps=20, save_steps=5, eval_steps=10, save_total_limit=2)
    ref_cfg = write_yaml(tmp_path / "ref.yaml", _train_cfg(assets, caches, tmp_path / "ref", **over))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("KD_PROGRESS_EVERY_S", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess runs (OMP_NUM_THREADS=1): the same arithmetic
    try:
        assert train(["--config", str(ref_cfg)]) == 0  # in-process: no second interpreter start-up
    finally:
        torch.set_num_threads(threads)
    assert "\r" not in capfd.readouterr().err

    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "run.yaml", _train_cfg(assets, caches, run, **over))
    proc = _popen(cfg, tmp_path / "killed.err")
    newest = run / "checkpoints" / "step-00000015"
    t0 = time.time()
    while not newest.exists():
        assert proc.poll() is None, (tmp_path / "killed.err").read_text()[-2000:]
        assert time.time() - t0 < 120, f"{newest} never appeared"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists()
    assert "\r" not in (tmp_path / "killed.err").read_text()
    shard = newest / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size - 100)
    (run / "run.lock").unlink()  # the killed run's lock (the next run takes it over with a warning line)

    listing = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    capfd.readouterr()
    _one_line_error(train, ["--config", cfg, f"resume={newest}"], capfd, newest, "__0_0.distcp")
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == listing  # nothing written

    proc = _popen(cfg, tmp_path / "resumed.err")
    out, _ = proc.communicate(timeout=240)
    err = _check_plain_log(tmp_path / "resumed.err")
    assert proc.returncode == 0, err[-2000:]
    assert "resumed from" in out and "step-00000010" in out
    warning = [ln for ln in err.splitlines() if "skipping" in ln]
    assert len(warning) == 1 and str(newest) in warning[0] and "__0_0.distcp" in warning[0]
    a, b = load_file(tmp_path / "ref" / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert _train_rows(run) == _train_rows(tmp_path / "ref")
    assert all(verify_checkpoint(p) is None for p in complete_checkpoints(run))


CONSOLE_SCRIPTS = {"precompute-teacher": "stages.precompute_teacher", "train-student": "stages.train_student",
                   "inspect-losses": "stages.inspect_losses", "inspect-cache": "stages.inspect_cache"}


@pytest.mark.parametrize("script", sorted(CONSOLE_SCRIPTS))
def test_help_lists_every_flag(script, capsys):
    """Every ``--flag`` string in a console script's module appears in its ``--help``."""
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[script] == CONSOLE_SCRIPTS[script] + ":main"
    module = importlib.import_module(CONSOLE_SCRIPTS[script])
    source = Path(module.__file__).read_text()
    flags = set(re.findall(r"[\"'](--[a-z][a-z0-9-]*)", source))
    if "run_stage" in source:  # the flag every stage shares (pipeline/cli.py)
        flags.add("--config")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f in out for f in flags), (flags, out)
    if script == "train-student":
        assert "--lr-find" in out


def test_nonfinite_loss_stops_the_run_naming_step_and_samples(assets, caches, tmp_path, capfd):
    """A student whose final norm is NaN: train-student stops at step 1 with one line naming the
    step and the micro-batch's sample IDs; no checkpoint or final/ is written after it."""
    from transformers import AutoModelForCausalLM

    from stages.train_student import main as train

    student = tmp_path / "nan-student"
    model = AutoModelForCausalLM.from_pretrained(assets["teacher"])
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(student)
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "t.yaml", _train_cfg(assets, caches, run, save_steps=1))
    capfd.readouterr()  # the progress bars of loading and saving the NaN student above
    err = _one_line_error(train, ["--config", cfg, f"student.path={student}", "student.init=pretrained"], capfd,
                          "non-finite loss", "step 1", "skip_nonfinite=0")
    assert re.search(r"samples on rank 0: \S+", err)
    assert not (run / "final").exists() and not complete_checkpoints(run)


def test_corrupt_loss_log_part_is_named_never_skipped(assets, caches, tmp_path, capfd, monkeypatch):
    """A truncated loss-log part: inspect-losses and a resuming train-student (which trims the
    logs back to its checkpoint) stop with one line naming the part instead of dropping its rows."""
    from stages.inspect_losses import main as inspect
    from stages.train_student import main as train

    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "t.yaml", _train_cfg(assets, caches, run, max_steps=6, save_steps=3, eval_steps=100))
    assert train(["--config", str(cfg)]) == 0
    part = sorted((run / "loss_logs").rglob("part-*.parquet"))[0]
    os.truncate(part, 100)
    capfd.readouterr()
    _one_line_error(inspect, [run], capfd, "inspect-losses: error:", str(part), "not readable parquet")
    _one_line_error(train, ["--config", cfg, "max_steps=9"], capfd, "train-student: error:", str(part))


def test_checkpoint_of_another_student_is_named(assets, caches, tmp_path, capfd, monkeypatch):
    """Resuming an output_dir whose checkpoint belongs to a student of another shape: one line
    naming the checkpoint and the mismatched tensor (torch.distributed.checkpoint's exception
    derives from BaseException and used to escape as a traceback); the checkpoint is untouched."""
    import json

    from pipeline.student.checkpoint import verify_checkpoint
    from stages.train_student import main as train

    monkeypatch.setenv("WANDB_MODE", "disabled")
    wider = tmp_path / "wider"
    shutil.copytree(assets["student"], wider)
    conf = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**conf, "hidden_size": 24, "intermediate_size": 40}))
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "t.yaml", _train_cfg(assets, caches, run, max_steps=3, save_steps=3, eval_steps=100))
    assert train(["--config", str(cfg)]) == 0
    ckpt = run / "checkpoints" / "step-00000003"
    capfd.readouterr()
    _one_line_error(train, ["--config", cfg, "max_steps=6", f"student.path={wider}"], capfd, "train-student: error:",
                    str(ckpt), "Size mismatch")
    assert verify_checkpoint(ckpt) is None
