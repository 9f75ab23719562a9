"""Errors of the storage under a run: a full disk, a quota, a read-only or failing device.

Every place that writes something a later step relies on (a cache shard, its marker, the
manifest, a loss-log part, a checkpoint, an export, ``run.json``) writes under a temporary
name and renames last, inside :func:`writing`. An ``OSError`` there (``ENOSPC``, ``EDQUOT``,
``EIO``, ``EROFS``...; pyarrow's ``ArrowIOError`` and torch.distributed.checkpoint's
``CheckpointException`` wrapping one included) becomes a :class:`StorageError` naming what was
being written and where; the temporary file or directory is removed (best effort, to give the
space back) and nothing is marked complete. ``pipeline.cli`` reports it as one line with exit
code 2: the user frees space (or fixes the device) and reruns, and the rerun resumes from what
was complete before.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


class StorageError(RuntimeError):
    """Writing ``what`` at ``path`` failed with an I/O error; nothing of it is marked complete.

    Attributes:
        path: the file or directory that was being written.
        errno: the underlying ``errno`` when known (28 = ENOSPC), else ``None``.
    """

    def __init__(self, what: str, path: str | os.PathLike, cause: BaseException, errno: int | None):
        self.path, self.errno = str(path), errno
        super().__init__(f"could not write {what} {path}: {_describe(cause)}; it is not marked complete "
                         f"and what was complete before is kept: free space or fix the storage, then rerun")


def _rank_failures(e: BaseException) -> dict[int, BaseException]:
    """The per-rank exceptions of a torch.distributed.checkpoint ``CheckpointException``
    (``failures``: rank → ``(exception, stack summary)``); ``{}`` for any other exception."""
    failures = getattr(e, "failures", None)
    if not isinstance(failures, dict):
        return {}
    return {rank: w[0] if isinstance(w, tuple) else w for rank, w in sorted(failures.items())}


def one_line(msg: object, first: bool = False) -> str:
    """``msg`` (an exception or any text) as one line: its non-blank lines, whitespace folded,
    joined by `` / ``; with ``first``, only the first of them (for libraries whose messages go on
    with pages of hints). An exception with an empty message gives its type name. The one helper
    every error message of the project uses to quote another error."""
    lines = [" ".join(ln.split()) for ln in str(msg).splitlines() if ln.strip()]
    if not lines:
        return type(msg).__name__ if isinstance(msg, BaseException) else ""
    return lines[0] if first else " / ".join(lines)


def describe(e: BaseException, first: bool = False) -> str:
    """``Type: message`` of an exception in one line (:func:`one_line`); ``Type`` alone when
    the message is empty."""
    return f"{type(e).__name__}: {one_line(e, first)}" if str(e).strip() else type(e).__name__


def _describe(e: BaseException) -> str:
    """The I/O error inside ``e`` (a CheckpointException holds one per rank), in one line."""
    failures = _rank_failures(e)
    if failures:
        rank, inner = next(iter(failures.items()))
        return f"rank {rank}: {_describe(inner)}"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror} (errno {e.errno})"
    return describe(e)


def _errno_of(e: BaseException) -> int | None:
    failures = _rank_failures(e)
    if failures:
        return _errno_of(next(iter(failures.values())))
    return getattr(e, "errno", None)


def _is_io_failure(e: BaseException) -> bool:
    return isinstance(e, OSError) or any(isinstance(x, OSError) for x in _rank_failures(e).values())


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


@contextlib.contextmanager
def reading_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Iterator[None]:
    """Turn a failure of ``torch.distributed.checkpoint.load`` into a ``ValueError`` naming the
    checkpoint and the first rank's reason (a saved tensor whose shape differs from the
    student's: another architecture in the same ``output_dir``; a missing key; an unreadable file).

    ``CheckpointException`` derives from ``BaseException``, so without this it would escape every
    ``except Exception`` as a traceback.

    Raises:
        ValueError: the load failed; the message names ``path``.
    """
    try:
        yield
    except BaseException as e:
        if not _rank_failures(e) and not isinstance(e, (RuntimeError, ValueError, KeyError, OSError)):
            raise
        raise ValueError(f"{what} {path} cannot be loaded into this run: {_describe(e)}; a checkpoint of another "
                         f"student or optimizer? use another output_dir, resume: never, or the matching config") from None


@contextlib.contextmanager
def writing(what: str, path: str | os.PathLike, *cleanup: str | os.PathLike) -> Iterator[None]:
    """Turn an I/O error raised inside the block into a :class:`StorageError`.

    Args:
        what: what is being written, for the message ("cache shard", "checkpoint"...).
        path: where (named in the message).
        cleanup: temporary files or directories to remove when the block fails.
    Raises:
        StorageError: an ``OSError`` (or a ``CheckpointException`` caused by one) inside the block.
    """
    try:
        yield
    except BaseException as e:  # CheckpointException derives from BaseException
        if not _is_io_failure(e):
            raise
        for p in cleanup:
            _remove(Path(p))
        raise StorageError(what, path, e, _errno_of(e)) from e


def fault_point(point: str, n: int, rank: int) -> None:
    """Fault injection for the crash tests: ``KD_FAULT_KILL=[rankR:]POINT:N`` SIGKILLs this
    process when it reaches ``POINT`` with count ``n == N`` (on rank R only when the ``rankR:``
    prefix is given). A no-op when the variable is unset: the kill tests set it."""
    import signal

    spec = os.environ.get("KD_FAULT_KILL")
    if not spec:
        return
    parts = spec.split(":")
    if parts[0].startswith("rank"):
        if int(parts[0][4:]) != rank:
            return
        parts = parts[1:]
    if parts == [point, str(n)]:
        os.kill(os.getpid(), signal.SIGKILL)
