"""``pipeline.distributed.on_rank0``: rank 0 runs the function, every rank gets its result or
raises its exception. The 2-rank cases run this file's :func:`main` under ``torchrun`` (gloo,
CPU) through ``conftest.run_cli``; the one-process cases run in the test process."""
from __future__ import annotations

import atexit
import json
import sys
from pathlib import Path

import pytest

from pipeline.distributed import on_rank0
from pipeline.storage.errors import StorageError


def _answer(x: int, y: int = 0) -> dict:
    import torch.distributed as dist

    return {"computed_on": dist.get_rank() if dist.is_initialized() else None, "sum": x + y}


def _raise(exc: Exception):
    raise exc


def _outcome(fn, *args, **kwargs) -> dict:
    """What ``on_rank0(fn, ...)`` did on this rank: its value, or its exception's type, message
    and (for a StorageError) attributes."""
    try:
        return {"value": on_rank0(fn, *args, **kwargs)}
    except Exception as e:  # noqa: BLE001 — recorded for the comparison
        return {"error": type(e).__name__, "message": str(e), "path": getattr(e, "path", None),
                "errno": getattr(e, "errno", None)}


def main(argv: list[str] | None = None) -> int:
    """Under torchrun: every case once, in the same order on every rank; writes
    ``OUT/rank{r}.json`` (``argv[0]`` = OUT)."""
    import torch.distributed as dist

    from pipeline.distributed import finish, init_distributed

    out = Path((argv if argv is not None else sys.argv[1:])[0])
    info = init_distributed("cpu")
    calls = []

    def counted(x, y=0):
        calls.append(dist.get_rank())
        return _answer(x, y)

    class LocalError(Exception):  # not importable by name on the other ranks
        pass

    res = {
        "value": _outcome(counted, 40, y=2),
        "value_error": _outcome(_raise, ValueError("cache.dir /x: cannot be written (disk full)")),
        "file_not_found": _outcome(_raise, FileNotFoundError("resume: /ckpt is not a complete checkpoint")),
        # four constructor arguments: a plain pickle round trip cannot rebuild it
        "storage_error": _outcome(_raise, StorageError("the manifest", "/cache/manifest.json",
                                                       OSError(28, "No space"), 28)),
        "local_error": _outcome(_raise, LocalError("defined inside a function")),
        "unpicklable_result": _outcome(lambda: (lambda: None)),
        "after_errors": _outcome(counted, 1),  # the ranks are still in step
    }
    res["calls"] = calls
    res["world_size"] = info.world_size
    (out / f"rank{info.rank}.json").write_text(json.dumps(res))
    # interpreter finalization would run this; finish ends a torchrun worker before it
    atexit.register((out / f"finalized-rank{info.rank}").write_text, "atexit ran")
    return finish(0)  # barrier, teardown, and under torchrun the exit of the stages


def test_on_rank0_two_ranks(tmp_path):
    """2 ranks (torchrun, gloo): the value computed once, on rank 0, reaches both ranks; an
    exception raised on rank 0 is raised on both, same type and message."""
    from tests.conftest import run_cli

    res = run_cli(["tests.test_distributed", str(tmp_path)], nproc=2, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    assert not list(tmp_path.glob("finalized-rank*"))  # both ranks left through finish's os._exit
    assert r0["value"] == r1["value"] == {"value": {"computed_on": 0, "sum": 42}}
    assert r0["after_errors"] == r1["after_errors"] == {"value": {"computed_on": 0, "sum": 1}}
    assert r0["calls"] == [0, 0] and r1["calls"] == []  # fn runs on rank 0 only
    for case, error in (("value_error", "ValueError"), ("file_not_found", "FileNotFoundError"),
                        ("storage_error", "StorageError")):
        assert r0[case] == r1[case], case
        assert r0[case]["error"] == error, r0[case]
    assert r1["storage_error"]["path"] == "/cache/manifest.json" and r1["storage_error"]["errno"] == 28
    assert "could not write the manifest /cache/manifest.json" in r1["storage_error"]["message"]
    # a class the other ranks cannot import: its name and message in a RuntimeError
    assert (r0["local_error"]["error"], r0["local_error"]["message"]) == ("LocalError", "defined inside a function")
    assert (r1["local_error"]["error"], r1["local_error"]["message"]) == ("RuntimeError",
                                                                          "LocalError: defined inside a function")
    # a result that cannot be sent: the same TypeError on both ranks
    assert r0["unpicklable_result"] == r1["unpicklable_result"]
    assert r0["unpicklable_result"]["error"] == "TypeError"
    assert "cannot be sent to the other ranks" in r0["unpicklable_result"]["message"]


def test_finish_outside_torchrun_tears_down_and_returns_the_code(monkeypatch):
    """A plain ``python`` run (or a test calling a stage in-process) is not ended: ``finish``
    destroys the one-rank group and returns the code."""
    import torch.distributed as dist

    from pipeline.distributed import finish, init_distributed

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    init_distributed("cpu")
    assert dist.is_initialized()
    assert finish(3) == 3
    assert not dist.is_initialized()
    assert finish(0, sync=False) == 0  # no group left: nothing to do


def test_on_rank0_without_process_group_is_a_plain_call():
    assert on_rank0(_answer, 1, y=2) == {"computed_on": None, "sum": 3}
    err = ValueError("bad")
    with pytest.raises(ValueError) as got:
        on_rank0(_raise, err)
    assert got.value is err


def test_exceptions_travel_with_type_message_and_attributes():
    """The form :func:`on_rank0` sends to the other ranks rebuilds each exception (in-process)."""
    import pickle

    from pipeline.distributed import _portable_exception, _rebuild_exception

    storage = StorageError("a shard", "/c/s.parquet", OSError(5, "I/O error"), 5)
    for e in (ValueError("v"), KeyError("k"), FileNotFoundError(2, "gone", "/x"), storage):
        copy = _rebuild_exception(pickle.loads(pickle.dumps(_portable_exception(e))))
        assert type(copy) is type(e) and copy.args == e.args and str(copy) == str(e)
    copy = _rebuild_exception(pickle.loads(pickle.dumps(_portable_exception(storage))))
    assert (copy.path, copy.errno) == ("/c/s.parquet", 5)


if __name__ == "__main__":
    sys.exit(main())
