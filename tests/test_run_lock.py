"""One writer per run directory: while a live process holds a run directory's lock, a second
``train-student`` or ``distill-rounds`` on it is refused in one line naming the holder and
writes nothing; a lock left by a process that is gone is taken over with a warning; on a store
the lock object of a process gone on this host is taken over too."""
import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, loopback_s3, run_cli, train_config, write_yaml

from pipeline.storage.lock import LOCK_NAME, RunLock, RunLockHeld

HOLD = ("import sys, time; from pipeline.storage.lock import RunLock; RunLock(sys.argv[1], 'train-student').acquire(); "
        "print('held', flush=True); time.sleep(300)")


def _holder(run_dir) -> subprocess.Popen:
    """A process of its own holding ``run_dir``'s lock until killed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _dead_pid() -> int:
    """The PID of a process of this host that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_writer_refused_then_stale_lock_taken_over(assets, caches, tmp_path, capsys):
    from test_distill_rounds import driver_config

    run = tmp_path / "run"
    holder = _holder(run)
    try:
        with pytest.raises(RunLockHeld, match=f"pid {holder.pid} on host {socket.gethostname()}"):
            RunLock(run, "train-student").acquire()
        cfg = write_yaml(tmp_path / "t.yaml", train_config(assets, caches, run, max_steps=2))
        res = run_cli(["stages.train_student", "--config", str(cfg)])
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert f"pid {holder.pid}" in res.stderr and str(run / LOCK_NAME) in res.stderr
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written
        # distill-rounds takes the same lock on its output_dir
        rounds = write_yaml(tmp_path / "r.yaml", driver_config(assets, caches, tmp_path, run))
        res = run_cli(["stages.distill_rounds", "--config", str(rounds)])
        assert res.returncode == 2 and f"pid {holder.pid}" in res.stderr, res.stderr
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    # the holder died by SIGKILL: its lock file stays, naming it, but nobody holds it
    assert str(holder.pid) in (run / LOCK_NAME).read_text()
    lock = RunLock(run, "train-student")
    warning = lock.acquire()
    assert f"pid {holder.pid}" in warning and "taken over" in warning
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    with pytest.raises(RunLockHeld):  # held by this process now: a second acquire is refused too
        RunLock(run, "train-student").acquire()
    lock.release()
    assert not (run / LOCK_NAME).exists()
    with RunLock(run, "train-student"):  # free again
        assert (run / LOCK_NAME).is_file()
    capsys.readouterr()


def test_lock_object_on_a_store(tmp_path):
    from pipeline.storage import Remote

    with loopback_s3("kd-lock") as url:
        run = f"{url}/run"
        remote = Remote(run)
        other = {"host": "elsewhere", "pid": 1, "started": "2020-01-01T00:00:00Z"}
        remote.write_bytes(LOCK_NAME, json.dumps(other).encode())
        with pytest.raises(RunLockHeld, match=f"pid 1 on host elsewhere.*delete {run}/{LOCK_NAME}"):
            RunLock(run, "train-student").acquire()  # another host: cannot be checked from here
        gone = {**other, "host": socket.gethostname(), "pid": _dead_pid()}
        remote.write_bytes(LOCK_NAME, json.dumps(gone).encode())
        lock = RunLock(run, "train-student")
        assert f"pid {gone['pid']}" in lock.acquire()  # this host, process gone: stale
        with pytest.raises(RunLockHeld, match=f"pid {os.getpid()}"):
            RunLock(run, "train-student").acquire()
        lock.release()
        assert not remote.isfile(LOCK_NAME)


def test_file_system_without_locks_checks_the_holder(tmp_path, monkeypatch):
    """Where ``flock`` fails (some network mounts) the lock file is read as on a store."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run = tmp_path / "run"
    run.mkdir()
    here = {"host": socket.gethostname(), "started": "2020-01-01T00:00:00Z"}
    (run / LOCK_NAME).write_text(json.dumps({**here, "pid": os.getpid()}))
    with pytest.raises(RunLockHeld, match=f"pid {os.getpid()}"):  # alive: refused
        RunLock(run, "train-student").acquire()
    (run / LOCK_NAME).write_text(json.dumps({**here, "pid": _dead_pid()}))
    with RunLock(run, "train-student") as lock:  # gone: taken over
        assert lock.held and json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (run / LOCK_NAME).exists()
