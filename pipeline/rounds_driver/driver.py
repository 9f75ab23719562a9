"""The loop of ``distill-rounds`` and its record of finished steps, ``rounds.json``."""
from __future__ import annotations

import ctypes
import json
import signal
import subprocess
import time
from pathlib import Path

from pipeline.config import DistillRoundsConfig, dump_config
from pipeline.rounds_driver.checks import check_recorded, start_over
from pipeline.rounds_driver.plan import STEP_DIRS, STEPS, command, round_configs, round_dir, step_complete
from pipeline.storage import one_line, write_file
from pipeline.storage.errors import writing
from pipeline.storage.lock import RunLock


def read_state(output_dir: str | Path) -> dict:
    """``rounds.json`` (``{"steps": {"round-R/STEP": {...}}}``), or a fresh state.

    Raises:
        ValueError: ``rounds.json`` is not a JSON object with ``steps`` (truncated, edited):
            its path named, and what to do.
    """
    path = Path(output_dir) / "rounds.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {"steps": {}}
    except (ValueError, UnicodeDecodeError) as e:
        state = e
    if not isinstance(state, dict) or not isinstance(state.get("steps"), dict):
        why = one_line(state) if isinstance(state, Exception) else "no 'steps' mapping"
        raise ValueError(f"{path} is not a valid rounds state ({why}): restore it, or delete it and rerun (every "
                         "finished step is found again by its stage's completion marker)")
    return state


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


def run_rounds(cfg: DistillRoundsConfig, log=print, restart: bool = False) -> dict:
    """Run every round's steps not yet in ``rounds.json``; returns the final state.

    Before anything runs: every round's configs are built and checked (:func:`round_configs`:
    keys, inputs, lengths); the driver takes ``output_dir``'s lock (one writer per run
    directory, :class:`~pipeline.storage.lock.RunLock`); ``restart`` deletes the previous
    run's rounds (:func:`start_over`); the steps that have started before must resolve to the
    configs they ran with (:func:`check_recorded`).

    A step is marked complete (``rounds.json`` rewritten atomically) only once its stage's own
    completion marker exists (:func:`step_complete`); a step whose marker already exists (a
    driver killed after the stage ended) is marked without running again. A rerun therefore
    resumes at the first step not marked complete, and that stage resumes its partial output.
    Each step's resolved config is written to ``round-R/STEP.yaml`` before it runs.

    Raises:
        ConfigError: see :func:`round_configs` and :func:`check_recorded` (nothing runs then).
        RunLockHeld: another live process writes ``output_dir`` (named).
        ValueError: a stage exited non-zero or without its completion marker (round, step, exit
            code and its config named; rerun the same command to resume); a corrupt
            ``rounds.json`` (:func:`read_state`).
    """
    out = Path(cfg.output_dir)
    rounds = round_configs(cfg)
    with RunLock(out, "distill-rounds"):
        if restart:
            start_over(out, log)
        check_recorded(rounds, lambda r: round_dir(cfg, r))
        state = read_state(out)
        dump_config(cfg, out / "config.yaml")
        return _run_steps(cfg, rounds, state, log)


def _run_steps(cfg: DistillRoundsConfig, rounds: list[dict], state: dict, log) -> dict:
    """The loop of :func:`run_rounds` (its lock held, its checks passed)."""
    out = Path(cfg.output_dir)
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
