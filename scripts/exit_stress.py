"""Launch 2-rank ``torchrun`` runs again and again beside busy cores and count failed exits.

    python scripts/exit_stress.py --runs 100            # tests/dist_grad_check.py (one FSDP2 step)
    python scripts/exit_stress.py --runs 100 --busy 1 --nproc 2 -- \\
        stages.train_student --config my.yaml            # a stage

Without a command each run is the script of the gradient-equivalence tests,
``tests/dist_grad_check.py OUT 2 2`` (a tiny FSDP2 student, one optimizer step of 2
micro-batches per rank, the full state dict saved by rank 0), which ends through
``pipeline.distributed.finish`` as the stages do. With ``-- MODULE ARGS`` each run is
``python -m MODULE ARGS`` under torchrun, with ``output_dir=<tmp>/run-N`` appended (train-student;
pass ``--no-output-dir`` for other stages). A run's files are removed after a clean exit.

A run fails when its exit code is not 0 or its output holds ``terminate called`` (a C++ abort at
exit). ``--busy N`` starts N single-threaded busy loops for the whole session (the condition under
which ranks used to abort at process-group teardown). Prints one line per failed run and a summary
with both counts; exit code 1 when any run failed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--busy", type=int, default=1, help="busy-loop processes beside the runs")
    p.add_argument("--nproc", type=int, default=2, help="ranks per run (torchrun --nproc_per_node)")
    p.add_argument("--no-output-dir", action="store_true", help="do not append output_dir=... to the command")
    p.add_argument("--keep", type=Path, default=None, help="directory for the logs of failed runs")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- MODULE ARGS... (default: tests/dist_grad_check.py, one FSDP2 step)")
    args = p.parse_args(argv)
    cmd = [c for c in args.command if c != "--"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    work = Path(tempfile.mkdtemp(prefix="exit-stress-"))
    keep = args.keep or work
    failed = nonzero = aborted = 0
    t0 = time.time()
    what = " ".join(cmd) if cmd else "tests/dist_grad_check.py"
    try:
        for i in range(args.runs):
            res = subprocess.run(_launch(args, cmd, work / f"run-{i}"), capture_output=True, text=True,
                                 env=env, cwd=ROOT)
            log = res.stdout + res.stderr
            nonzero += res.returncode != 0
            aborted += "terminate called" in log
            if res.returncode != 0 or "terminate called" in log:
                failed += 1
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"failed-{i}.log").write_text(log)
                print(f"run {i}: exit code {res.returncode}; log {keep / f'failed-{i}.log'}", flush=True)
            else:
                shutil.rmtree(work / f"run-{i}", ignore_errors=True)
    finally:
        for b in busy:
            b.kill()
            b.wait()
    print(f"{failed} failed of {args.runs} runs of {what} ({nonzero} non-zero exit codes, {aborted} with "
          f"'terminate called'; {args.nproc} ranks, {args.busy} busy core(s)), {time.time() - t0:.0f} s", flush=True)
    if not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def _launch(args: argparse.Namespace, cmd: list[str], run_dir: Path) -> list[str]:
    """The torchrun command line of one run writing under ``run_dir``."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    if not cmd:
        run_dir.mkdir(parents=True, exist_ok=True)
        return [*torchrun, str(ROOT / "tests" / "dist_grad_check.py"), str(run_dir / "state.pt"), "2", "2"]
    extra = [] if args.no_output_dir else [f"output_dir={run_dir}"]
    return [*torchrun, "-m", *cmd, *extra]


if __name__ == "__main__":
    sys.exit(main())
