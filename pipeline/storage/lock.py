"""One writer per run directory: ``RUN_DIR/run.lock`` names the process that writes it.

Two processes writing one run directory (a job submitted twice; ranks left training as orphans
after their launcher was killed, then the same command rerun beside them) append the same
loss-log rows twice and race on checkpoints. ``train-student`` (its rank 0) and
``distill-rounds`` therefore take this lock before they write anything and give it back when
they end.

Locally the lock is an exclusive ``flock`` held on the open file for the writer's lifetime: the
kernel drops it when the process ends however it ends (SIGKILL included), so a lock file left
behind by a dead writer is *stale* and the next writer takes it over with a warning naming the
old holder. On a store (``s3://...``, no locks there) the lock is an object read, then written:
a holder on this host whose process is gone is stale; a holder on another host cannot be
checked from here, so the run is refused with the object to delete once that run is gone. The
store's check and write are two requests, not one atomic step. A local file system without
``flock`` (some network mounts) is treated as a store.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time

from pipeline.storage.folder import Folder

LOCK_NAME = "run.lock"
"""The lock file's name inside the run directory."""


class RunLockHeld(ValueError):
    """The run directory is being written by another live process (named in the message)."""


def _holder() -> dict:
    """This process as a lock holder: host, PID, start time (UTC) and command."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)[:300]}


def describe_holder(raw: bytes | str) -> str:
    """A lock file's content as ``pid P on host H, started T`` (``an unknown process`` when it
    cannot be read: a holder between creating and writing it)."""
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, TypeError, KeyError):
        return "an unknown process"


def _alive_here(raw: bytes) -> bool:
    """Whether the holder recorded in ``raw`` is a live process of this host (unknown: True)."""
    try:
        h = json.loads(raw)
        if h["host"] != socket.gethostname():
            return True
        os.kill(int(h["pid"]), 0)
    except ProcessLookupError:
        return False
    except (ValueError, TypeError, KeyError, PermissionError):
        return True
    return True


class RunLock:
    """The writer's lock on a run directory (local or a store URL).

    Args:
        run_dir: the run directory (created if missing: the lock lives in it).
        what: the command taking it, for messages (``train-student``, ``distill-rounds``).
    """

    def __init__(self, run_dir: str | os.PathLike, what: str):
        self.folder, self.what = Folder(run_dir), what
        self.path = self.folder.join(LOCK_NAME)
        self.fd: int | None = None
        self.held = self.created = False

    def acquire(self) -> str | None:
        """Take the lock; returns the warning printed when a stale lock was taken over, else None.

        Raises:
            RunLockHeld: a live process holds it: one line naming the directory, the holder
                (PID, host, start time) and the lock file.
        """
        self.created = not self.folder.is_remote and not self.folder.exists()
        self.folder.makedirs()
        try:
            taken_from = self._acquire_store() if self.folder.is_remote else self._acquire_local()
        except RunLockHeld:
            self.created = False
            raise
        self.held = True
        if taken_from is None:
            return None
        msg = (f"[{self.what}] warning: {self.folder} was locked by {describe_holder(taken_from)}, which is gone: "
               f"lock {self.path} taken over")
        print(msg, file=sys.stderr, flush=True)
        return msg

    def _refuse(self, raw: bytes, extra: str = "") -> RunLockHeld:
        return RunLockHeld(f"{self.folder} is being written by {describe_holder(raw)} (lock {self.path}): "
                           f"wait for that run to end or stop it{extra}; a second writer would duplicate its "
                           "loss-log rows and race on its checkpoints")

    def _acquire_local(self) -> bytes | None:
        """flock the lock file; returns the stale holder's record (or None for a fresh lock)."""
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raw = os.pread(fd, 4096, 0)
                os.close(fd)
                raise self._refuse(raw) from None
            except OSError:  # a file system without locks (some network mounts): as on a store
                os.close(fd)
                return self._acquire_store()
            try:  # the holder may have removed the file between our open and our flock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = os.pread(fd, 4096, 0)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return old or None

    def _acquire_store(self) -> bytes | None:
        """Read the lock object (or file, where the file system has no locks), refuse a live
        (or uncheckable) holder, write ours."""
        old = (self.folder.read_bytes(LOCK_NAME) or None) if self.folder.isfile(LOCK_NAME) else None
        if old is not None and _alive_here(old):
            raise self._refuse(old, f", or delete {self.path} if it is gone")
        self.folder.write_bytes(LOCK_NAME, json.dumps(_holder()).encode())
        return old

    def release(self) -> None:
        """Give the lock back (remove the file, then drop the flock); a no-op when not held. A
        directory that the lock created and nothing else wrote into is removed too: a run
        refused before it wrote anything leaves no trace."""
        if not self.held:
            return
        self.held = False
        if self.fd is None:  # a store, or a file system without locks
            self.folder.remove(LOCK_NAME)
        else:
            try:
                if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            finally:
                os.close(self.fd)
                self.fd = None
        if self.created:
            try:
                self.folder.dir.rmdir()  # only when empty
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
