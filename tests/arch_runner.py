"""Many stage runs in one process, one after another in one process group, so that a 2-rank
check of many models pays for one ``torchrun`` (tests/test_architectures.py).

Run as ``torchrun --standalone --nproc_per_node=2 tests/arch_runner.py JOBS OUT``: ``JOBS`` is a
JSON list of ``{"stage": "precompute" | "train", "config": YAML path}``; each job calls the
stage's own function (``pipeline.teacher.precompute.precompute``,
``pipeline.student.loop.run``) with its config. Rank 0 writes ``OUT``: one
``{"config", "error"}`` per job, ``error`` None or ``"Type: message"`` (a job that raises on
every rank, e.g. a refused model, does not stop the others).

The sharded loader's whole-model path (``from_pretrained``) raises here: every teacher and
pretrained student must be loaded row by row.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.models.sharded  # noqa: E402
from pipeline.config import PrecomputeConfig, TrainStudentConfig  # noqa: E402
from pipeline.config.loading import load_config  # noqa: E402
from pipeline.distributed import barrier, finish, init_distributed  # noqa: E402


def _no_whole_load(p, what, dtype):
    raise AssertionError(f"{what} {p}: whole-model load (from_pretrained) in the sharded loader")


def main(jobs_file: str, out_file: str) -> int:
    from pipeline.student.loop import run
    from pipeline.teacher.precompute import precompute

    pipeline.models.sharded.from_pretrained = _no_whole_load
    stages = {"precompute": (PrecomputeConfig, precompute), "train": (TrainStudentConfig, run)}
    info = init_distributed("cpu")
    results = []
    for job in json.loads(Path(jobs_file).read_text()):
        cls, fn = stages[job["stage"]]
        error = None
        try:
            fn(load_config(cls, job["config"]), info)
        except Exception as e:  # noqa: BLE001 - recorded for the test, which names it
            error = f"{type(e).__name__}: {e}"
        barrier()
        results.append({"config": job["config"], "error": error})
    if info.is_main:
        Path(out_file).write_text(json.dumps(results))
    return finish(0)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
