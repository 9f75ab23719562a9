"""A clean install: the built wheel holds the ``pipeline`` and ``stages`` packages only (no
top-level ``data`` that would shadow a user's own), installs into a fresh virtual environment
offline, and its six console scripts and ``python -m stages.precompute_teacher`` answer
``--help`` from there.

The wheel is built with the running environment's setuptools (no build isolation: no network)
from a copy of the repository, and installed with ``--no-deps``; the dependencies (torch,
transformers, ...) come from the running environment's site-packages, added to the fresh
environment as a path entry (its ``.pth`` files, among them an editable install of this
repository, are not processed: nothing is imported from the checkout).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
# builds without isolation (offline): setuptools from 70.1 on builds wheels without the wheel package
pytest.importorskip("setuptools", minversion="70.1", reason="an offline wheel build needs setuptools >= 70.1 here")

ROOT = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(".git", ".venv", "runs", "site", "build", "dist", "*.egg-info", "__pycache__", "wandb",
                              ".pytest_cache")


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP, symlinks=True)
    dist = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                        "--wheel-dir", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (wheel,) = dist.glob("kd_pipeline-*.whl")
    return wheel


def _fresh_env(tmp: Path, wheel: Path) -> Path:
    """A new virtual environment with the wheel installed (no dependencies) and the running
    environment's site-packages as a path entry; returns its ``bin`` directory."""
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    bindir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index", "--no-deps", "-q",
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "_running_env_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return bindir


def test_wheel_installs_cleanly_and_its_commands_run(tmp_path):
    wheel = _build_wheel(tmp_path)
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {"pipeline", "stages"} <= top and not top - {"pipeline", "stages"} - {n for n in top if n.endswith(".dist-info")}, top
    bindir = _fresh_env(tmp_path, wheel)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) == 6
    python = str(bindir / "python")
    checks = {name: [str(bindir / name), "--help"] for name in scripts}
    checks["python -m stages.precompute_teacher"] = [python, "-m", "stages.precompute_teacher", "--help"]
    checks["where"] = [python, "-c", "import pipeline, stages, pipeline.kd; print(pipeline.__file__, stages.__file__)"]
    checks["import data"] = [python, "-c", "import data"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    procs = {name: subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, cmd in checks.items()}  # in parallel: each imports torch
    out = {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}
    for name in [*scripts, "python -m stages.precompute_teacher"]:
        code, stdout, stderr = out[name]
        assert code == 0 and "usage:" in stdout, f"{name} --help: exit {code}\n{stderr[-2000:]}"
    code, stdout, stderr = out["where"]
    assert code == 0, stderr[-2000:]
    assert all(Path(p).is_relative_to(tmp_path / "venv") for p in stdout.split()), stdout  # not the checkout
    code, _, stderr = out["import data"]
    assert code != 0 and "No module named 'data'" in stderr, stderr[-2000:]
