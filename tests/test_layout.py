"""The layout shows the two stages: stage 1 (``pipeline.teacher``) and stage 2
(``pipeline.student``, with ``pipeline.kd``, its public API for other trainers) never import
each other, the shared packages import neither, and the top level of ``pipeline/`` holds
packages plus a few shared modules."""
from __future__ import annotations

import ast
from pathlib import Path

PIPELINE = Path(__file__).resolve().parent.parent / "pipeline"
STAGES = ("pipeline.teacher", "pipeline.student")
PART_OF = {"pipeline.kd": "pipeline.student"}
"""Packages that belong to a stage for these rules: ``pipeline.kd`` is stage 2's public API."""


def _imports(path: Path) -> set[str]:
    """Every module imported anywhere in ``path`` (top level and inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def _package(path: Path) -> str:
    rel = path.relative_to(PIPELINE.parent).with_suffix("")
    name = ".".join(rel.parts[:2])
    return PART_OF.get(name, name)


def _edges() -> list[tuple[str, str, str]]:
    """(file, its package, an imported pipeline package) for every import between packages."""
    edges = []
    for f in PIPELINE.rglob("*.py"):
        src = _package(f)
        for mod in _imports(f):
            if mod.startswith("pipeline."):
                dst = ".".join(mod.split(".")[:2])
                dst = PART_OF.get(dst, dst)
                if dst != src:
                    edges.append((str(f.relative_to(PIPELINE.parent)), src, dst))
    return edges


def test_no_import_between_stage_one_and_stage_two():
    bad = [e for e in _edges() if e[1] in STAGES and e[2] in STAGES]
    assert not bad, f"stage 1 and stage 2 import each other: {bad}"


def test_shared_packages_import_no_stage():
    bad = [e for e in _edges() if e[1] not in STAGES and e[2] in STAGES]
    assert not bad, f"a shared package imports a stage: {bad}"


def test_local_vs_store_decided_in_the_storage_package():
    """Writers and readers go through ``storage.Folder``; outside the storage package only
    config validators (a URL where a local path is required) and dataset loading ask."""
    sites = [f"{p.relative_to(PIPELINE.parent)}:{i}" for p in sorted(PIPELINE.rglob("*.py"))
             if "storage" not in p.relative_to(PIPELINE).parts
             for i, line in enumerate(p.read_text().splitlines(), 1) if "is_remote(" in line]
    assert len(sites) <= 5, sites


def test_top_level_is_packages_and_at_most_six_shared_modules():
    modules = sorted(p.name for p in PIPELINE.glob("*.py") if p.name != "__init__.py")
    packages = sorted(p.name for p in PIPELINE.iterdir() if (p / "__init__.py").is_file())
    assert len(modules) <= 6, modules
    assert {"teacher", "student", "cache", "losslog", "data", "models", "config", "storage"} <= set(packages)


def test_no_library_function_over_100_lines():
    """Long functions hide the phases of a loop; the two fused chunk loops may read best whole."""
    allowed = {"forward", "fused_topk_targets"}  # _FusedLinearLoss.forward, the teacher's fused top-k
    long = []
    for f in PIPELINE.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 100 and node.name not in allowed:
                    long.append((str(f.relative_to(PIPELINE.parent)), node.name, n))
    assert not long, long
