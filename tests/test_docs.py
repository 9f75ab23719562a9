"""The documentation cannot drift from the code: the generated reference pages equal a fresh
generation, they name every config field, and the site builds with ``mkdocs build --strict``."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_reference  # noqa: E402

from pipeline.config import PrecomputeConfig, TrainStudentConfig  # noqa: E402


def test_reference_pages_are_up_to_date(tmp_path):
    gen_reference.generate(tmp_path)
    for name in ("config.md", "cli.md"):
        committed = (ROOT / "docs" / "reference" / name).read_text(encoding="utf-8")
        fresh = (tmp_path / name).read_text(encoding="utf-8")
        assert fresh == committed, (f"docs/reference/{name} is out of date: "
                                    f"run `python scripts/gen_reference.py` and commit the result")


def test_config_reference_names_every_field():
    page = (ROOT / "docs" / "reference" / "config.md").read_text(encoding="utf-8")
    keys = {row.split("`")[1] for row in page.splitlines() if row.startswith("| `")}
    for cls in (PrecomputeConfig, TrainStudentConfig):
        rows = gen_reference.walk(cls)
        assert rows
        for key, *_ in rows:
            assert key in keys, f"{cls.__name__}: {key} missing from docs/reference/config.md"
        for name in cls.model_fields:  # the top level, independently of the walk
            assert name in keys, f"{cls.__name__}.{name} missing from docs/reference/config.md"
    # nested sections are expanded, including lists of sections
    assert {"cache.k", "teachers[].path", "loss.router.z_loss_coef", "optim.param_groups[].pattern"} <= keys


def test_cli_reference_covers_every_console_script():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    page = (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    listed = dict(gen_reference.CONSOLE_SCRIPTS)
    for cmd, target in scripts.items():
        assert listed.get(cmd) == target.split(":")[0], f"{cmd} not in gen_reference.CONSOLE_SCRIPTS"
        assert f"usage: {cmd}" in page


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("mkdocs", "material", "mkdocstrings")),
                    reason="mkdocs, mkdocs-material or mkdocstrings not installed (pip install -e '.[dev]')")
def test_mkdocs_build_strict(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()
