"""The loop of ``distill-rounds`` and its record of finished steps, ``rounds.json``."""
from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import time
from pathlib import Path

from pipeline.config import DistillRoundsConfig, dump_config
from pipeline.rounds_driver.plan import STEP_DIRS, STEPS, command, round_configs, round_dir, step_complete
from pipeline.storage import write_file
from pipeline.storage.errors import writing


def read_state(output_dir: str | Path) -> dict:
    """``rounds.json`` (``{"steps": {"round-R/STEP": {...}}}``), or a fresh state."""
    try:
        return json.loads((Path(output_dir) / "rounds.json").read_text())
    except FileNotFoundError:
        return {"steps": {}}


def _write_state(output_dir: Path, state: dict) -> None:
    """Replace ``rounds.json`` atomically (temporary file, then rename)."""
    path = output_dir / "rounds.json"
    with writing("the rounds state", path):
        write_file(path, json.dumps(state, indent=1).encode())


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when the driver dies, even by SIGKILL, so
    no stage keeps writing beside a rerun (a stage checkpoints on SIGTERM)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:  # not glibc: the child outlives a killed driver
        pass


def run_rounds(cfg: DistillRoundsConfig, log=print) -> dict:
    """Run every round's steps not yet in ``rounds.json``; returns the final state.

    A step is marked complete (``rounds.json`` rewritten atomically) only once its stage's own
    completion marker exists (:func:`step_complete`); a step whose marker already exists (a
    driver killed after the stage ended) is marked without running again. A rerun therefore
    resumes at the first step not marked complete, and that stage resumes its partial output.
    Each step's resolved config is written to ``round-R/STEP.yaml`` before it runs.

    Raises:
        ConfigError: see :func:`round_configs` (nothing runs then).
        ValueError: a stage exited non-zero or without its completion marker (round, step, exit
            code and its config named; rerun the same command to resume).
    """
    out = Path(cfg.output_dir)
    rounds = round_configs(cfg)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out / "config.yaml")
    state = read_state(out)
    for r, steps in enumerate(rounds):
        for step in STEPS:
            key = f"round-{r}/{step}"
            if state["steps"].get(key, {}).get("complete"):
                log(f"[rounds] {key} already complete")
                continue
            target = round_dir(cfg, r) / STEP_DIRS[step]
            if not step_complete(step, target):
                cfg_path = round_dir(cfg, r) / f"{step}.yaml"
                round_dir(cfg, r).mkdir(parents=True, exist_ok=True)
                dump_config(steps[step], cfg_path)
                log(f"[rounds] {key}: {' '.join(command(step, cfg_path, cfg.nproc_per_node))}")
                t0 = time.time()
                code = subprocess.run(command(step, cfg_path, cfg.nproc_per_node), preexec_fn=_die_with_parent).returncode
                if code != 0 or not step_complete(step, target):
                    raise ValueError(f"round {r} step {step} ({cfg_path}) "
                                     + (f"exited with code {code}" if code else "ended without its completion marker")
                                     + "; rerun distill-rounds to resume")
                log(f"[rounds] {key} done in {time.time() - t0:.0f}s")
            state["steps"][key] = {"complete": True, "output": str(target), "finished_at": time.time()}
            _write_state(out, state)
    return state
