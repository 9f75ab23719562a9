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

Requests to an object store fail for other reasons, which the user fixes in different places:
an unreachable endpoint, refused credentials, a missing bucket, a missing object, throttling.
:func:`store_kind` / :func:`store_cause` tell them apart, in this one place, from the exceptions
of botocore, aiobotocore, aiohttp and s3fs (s3fs turns most error codes into ``OSError``
subclasses with the ``ClientError`` as cause); :func:`store_error` / :func:`store_requests` turn
such a failure into a :class:`StoreError` (``URL: cause; what to do``; a missing object a
:class:`StoreNotFound`, still a ``FileNotFoundError``), and :func:`writing` names the cause of a
failed write on a store. ``docs/guide/object-storage.md`` has the table.
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
        store: ``(cause, what to do)`` when a request to an object store failed
            (:func:`store_cause`), else ``None``.
    """

    def __init__(self, what: str, path: str | os.PathLike, cause: BaseException, errno: int | None,
                 store: tuple[str, str] | None = None):
        self.path, self.errno, self.store = str(path), errno, store
        reason, advice = store or (_describe(cause), "free space or fix the storage")
        super().__init__(f"could not write {what} {path}: {reason}; it is not marked complete "
                         f"and what was complete before is kept: {advice}, then rerun")


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
        StorageError: an ``OSError`` (or a ``CheckpointException`` caused by one) inside the block;
            for a URL also any failed store request (:func:`store_cause`: unreachable endpoint,
            refused credentials, missing bucket, throttling), the cause named.
    """
    try:
        yield
    except BaseException as e:  # CheckpointException derives from BaseException
        store = _store_failure(e, path)
        if store is None and not _is_io_failure(e):
            raise
        for p in cleanup:
            _remove(Path(p))
        raise StorageError(what, path, e, _errno_of(e), store) from e


def _store_failure(e: BaseException, path: str | os.PathLike) -> tuple[str, str] | None:
    """``(cause, what to do)`` when writing the URL ``path`` failed in a store request (a
    missing object is left to the I/O error path); ``None`` otherwise and for local paths."""
    from pipeline.storage.paths import is_remote

    found = store_kind(e) if is_remote(path) else None
    if found is None or found[0] == "object":
        return None
    return store_cause(e, str(path).split("://", 1)[-1].split("/", 1)[0]), STORE_ADVICE[found[0]]


# ---------------------------------------------------------------------------------------------
# Object-store requests: one classification of why a request failed (store_cause), used by
# every place a store request can fail (pipeline.storage.folder's Remote, check_access, writing,
# the cache and loss-log readers).

_CREDENTIALS = {  # code -> what it means
    "InvalidAccessKeyId": "the access key is unknown to the store",
    "SignatureDoesNotMatch": "the secret key does not match the access key",
    "ExpiredToken": "the session token has expired", "ExpiredTokenException": "the session token has expired",
    "InvalidToken": "the session token is invalid", "TokenRefreshRequired": "the session token must be refreshed",
    "InvalidClientTokenId": "the access key is unknown to the store", "InvalidSecurity": "invalid security token",
    "RequestTimeTooSkewed": "this machine's clock differs too much from the store's",
    "AccessDenied": "access denied to this bucket or prefix", "AccessDeniedException": "access denied",
    "AllAccessDisabled": "all access to this bucket is disabled", "AccountProblem": "a problem with the account",
    "403": "HTTP 403 Forbidden: wrong credentials or no permission",
}
_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
               "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
               "ProvisionedThroughputExceededException", "BandwidthLimitExceeded", "ServiceUnavailable",
               "503", "429"}
_NO_OBJECT = {"NoSuchKey", "NoSuchVersion", "NoSuchUpload", "404", "NotFound"}
_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ProxyConnectionError",
                "ClientConnectorError", "ClientConnectionError", "ServerDisconnectedError", "ClientOSError",
                "ConnectionRefusedError", "ConnectionResetError", "gaierror"}
_TIMEOUT = {"ReadTimeoutError", "FSTimeoutError", "TimeoutError", "ServerTimeoutError"}

_STORE_CLIENTS = {"botocore", "aiobotocore", "aiohttp", "s3fs", "fsspec", "gcsfs", "adlfs", "azure", "google",
                  "urllib3"}
_STORE_MODULES = _STORE_CLIENTS | {"asyncio", "concurrent"}

STORE_ADVICE = {
    "unreachable": "check the endpoint (FSSPEC_S3_ENDPOINT_URL or storage_options endpoint_url) and that the "
                   "store is running and reachable from this machine",
    "timeout": "check the network to the store, or rerun later",
    "credentials": "check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, or "
                   "storage_options key / secret) and their permissions on the bucket",
    "bucket": "create the bucket, or fix the URL",
    "object": "check the URL (a typo? not written yet?)",
    "throttling": "rerun later (the run resumes) or lower the request rate (fewer ranks or loader threads)",
    "failed": "rerun later; if it persists, check the store",
}
"""What the user does about each kind of store failure (:func:`store_kind`), for the messages."""


def _chain(e: BaseException) -> list[BaseException]:
    """``e``, then its causes and contexts (inner first after ``e``), and the per-rank failures of
    a torch.distributed.checkpoint ``CheckpointException``."""
    out: list[BaseException] = []
    todo = [e]
    while todo:
        x = todo.pop(0)
        if x is None or any(x is y for y in out) or len(out) > 20:
            continue
        out.append(x)
        todo += list(_rank_failures(x).values()) + [x.__cause__, None if x.__suppress_context__ else x.__context__]
    return out


def _names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def _endpoint(chain: list[BaseException]) -> str:
    """``scheme://host:port`` of the endpoint a connection error names, or ``""``."""
    from urllib.parse import urlsplit

    for x in chain:
        url = (getattr(x, "kwargs", None) or {}).get("endpoint_url")
        if url:
            parts = urlsplit(str(url))
            return f"{parts.scheme}://{parts.netloc}" if parts.netloc else str(url)
    return ""


def _reason(chain: list[BaseException]) -> str:
    """The innermost system-level reason of a connection failure (``Connection refused``...)."""
    for x in reversed(chain):
        if isinstance(x, OSError) and isinstance(x.errno, int) and x.errno > 0:
            return os.strerror(x.errno)  # "Connection refused", not asyncio's "Connect call failed (host, port)"
        if isinstance(x, OSError) and x.strerror:
            return x.strerror.strip().rstrip(".")
    return type(chain[0]).__name__


def store_kind(e: BaseException, bare: bool = False) -> tuple[str, str] | None:
    """Why a request to an object store failed: ``(kind, detail)``, or ``None`` when ``e`` is
    not a store failure (a local I/O error, a bug...).

    Kinds (the keys of :data:`STORE_ADVICE`): ``unreachable`` (nothing answers at the endpoint:
    botocore's ``EndpointConnectionError``, ``ConnectTimeoutError``, aiohttp's connector errors;
    detail: ``"ENDPOINT|reason"``), ``timeout`` (``ReadTimeoutError``, fsspec's
    ``FSTimeoutError``), ``credentials`` (``ClientError`` codes ``InvalidAccessKeyId``,
    ``SignatureDoesNotMatch``, ``ExpiredToken``, ``AccessDenied``, HTTP 403...; s3fs raises them
    as ``PermissionError`` with the ``ClientError`` as its cause), ``bucket`` (``NoSuchBucket``, a
    404 of ``HeadBucket``; detail: the bucket), ``object`` (``NoSuchKey``, 404), ``throttling``
    (``SlowDown``, ``Throttling``, ``ThrottlingException``, HTTP 503/429: s3fs has retried them
    and raises ``OSError(EBUSY)``), ``failed`` (any other ``ClientError`` code). A
    :class:`StoreError` keeps its kind.

    Args:
        e: the exception (its causes, contexts and a ``CheckpointException``'s per-rank failures
            are searched too).
        bare: also take s3fs's own ``FileNotFoundError(path)`` / ``PermissionError`` without a
            store cause and without an errno as ``object`` / ``credentials`` (only where the
            exception certainly comes from a store request).
    """
    chain = _chain(e)
    for x in chain:
        if isinstance(x, StoreError):
            return x.kind, x.cause
    for x in chain:
        resp = getattr(x, "response", None)
        if isinstance(resp, dict) and isinstance(resp.get("Error"), dict):
            err = resp["Error"]
            status = str((resp.get("ResponseMetadata") or {}).get("HTTPStatusCode") or "")
            code = str(err.get("Code") or status)
            if code == "NoSuchBucket" or (code in ("404", "NotFound") and getattr(x, "operation_name", "") == "HeadBucket"):
                return "bucket", str(err.get("BucketName") or "")
            if code in _NO_OBJECT:
                return "object", code
            if code in _CREDENTIALS:
                return "credentials", code
            if code in _THROTTLING or status in ("503", "429"):
                return "throttling", code
            return "failed", f"{code}: {one_line(err.get('Message') or '', first=True)}".rstrip(": ")
    if not any(type(x).__module__.split(".")[0] in _STORE_CLIENTS for x in chain):
        chain = []  # a connection error or timeout of something else (a process group, wandb...)
    for x in chain:
        names = _names(x)
        if names & _UNREACHABLE:
            return "unreachable", f"{_endpoint(chain)}|{_reason(chain)}"
        if names & _TIMEOUT:
            return "timeout", type(x).__name__
    if bare and getattr(e, "errno", None) is None and type(e) in (FileNotFoundError, PermissionError):
        return ("object", "") if isinstance(e, FileNotFoundError) else ("credentials", "")
    return None


def store_cause(e: BaseException, bucket: str = "", attempts: int | None = None, bare: bool = False) -> str | None:
    """The cause of a failed store request in words (one line), or ``None`` when ``e`` is not one
    (see :func:`store_kind` for what is recognised):

    - ``the endpoint http://HOST:PORT is unreachable (Connection refused)``
    - ``the store refused the credentials (InvalidAccessKeyId: the access key is unknown to the store)``
    - ``bucket 'b' does not exist``
    - ``no such object``
    - ``the store is throttling requests (SlowDown) after 5 attempts``

    Args:
        bucket: the bucket of the request, named when the store's answer does not name it.
        attempts: how many times the client tried (s3fs's ``retries``), for throttling.
        bare: see :func:`store_kind`.
    """
    found = store_kind(e, bare)
    if found is None:
        return None
    kind, detail = found
    for x in _chain(e):
        if isinstance(x, StoreError):
            return x.cause
    if kind == "unreachable":
        endpoint, _, reason = detail.partition("|")
        return f"the endpoint {endpoint or '(default)'} is unreachable ({reason})"
    if kind == "timeout":
        return f"the store did not answer in time ({detail})"
    if kind == "credentials":
        if detail == "403":  # a HEAD request: the answer has no body, hence no code
            return f"the store refused the credentials ({_CREDENTIALS[detail]})"
        return "the store refused the credentials" + (f" ({detail}: {_CREDENTIALS[detail]})" if detail in _CREDENTIALS
                                                      else " (permission denied)")
    if kind == "bucket":
        return f"bucket {detail or bucket!r} does not exist"
    if kind == "object":
        return "no such object"
    if kind == "throttling":
        return f"the store is throttling requests ({detail})" + (f" after {attempts} attempts" if attempts else "")
    return f"the store failed the request ({detail})"


class StoreError(OSError):
    """A request to an object store failed for a reason the user fixes outside this program
    (:func:`store_kind`): the message is one line, ``[KEY] URL: CAUSE; WHAT TO DO``.

    Attributes:
        url: the object or prefix of the request.
        kind: the :func:`store_kind` kind (``unreachable``, ``credentials``, ``bucket``...).
        cause: the :func:`store_cause` words.
    """

    def __init__(self, message: str, url: str = "", kind: str = "failed", cause: str = ""):
        super().__init__(message)
        self.url, self.kind, self.cause = url, kind, cause


class StoreNotFound(StoreError, FileNotFoundError):
    """No object or prefix at the URL (a :class:`FileNotFoundError`, as before: callers that
    treat a missing file as "absent" keep doing so); the message is ``URL: no such object``."""


def store_error(e: BaseException, url: str, attempts: int | None = None, key: str = "",
                bare: bool = False) -> StoreError | None:
    """``e`` as a :class:`StoreError` naming ``url`` (and the config ``key``, if given) and the
    cause (:func:`store_cause`); a missing object gives a :class:`StoreNotFound`. ``None`` when
    ``e`` is not a store failure: the caller re-raises it.

    Args:
        e: the exception of the request.
        url: the object or prefix (named first in the message).
        attempts: s3fs's ``retries`` (named for throttling).
        key: the config key or argument that gave ``url``.
        bare: see :func:`store_kind` (only at the request itself).
    """
    if isinstance(e, StoreError) and not key:
        return e
    if isinstance(e, StorageError) or not (isinstance(e, OSError) or _rank_failures(e)
                                           or type(e).__module__.split(".")[0] in _STORE_MODULES):
        return None  # our own message (which may quote a store error): kept
    found = store_kind(e, bare)
    if found is None or (found[0] == "object" and not bare and not isinstance(e, StoreNotFound)):
        return None  # a missing object away from the request: the caller's own message says what is missing
    bucket = str(url).split("://", 1)[-1].split("/", 1)[0]
    cause = store_cause(e, bucket, attempts, bare)
    where = f"{key} {url}" if key else str(url)
    if found[0] == "object":
        return StoreNotFound(f"{where}: {cause}", str(url), found[0], cause)
    return StoreError(f"{where}: {cause}; {STORE_ADVICE[found[0]]}", str(url), found[0], cause)


@contextlib.contextmanager
def store_requests(url: str | os.PathLike, attempts: int | None = None, bare: bool = False) -> Iterator[None]:
    """Turn a failed store request inside the block into a :class:`StoreError` naming ``url``
    and the cause (:func:`store_error`); any other exception passes unchanged. A no-op for a
    local path.

    Raises:
        StoreError: a store request failed (:class:`StoreNotFound` for a missing object, with
            ``bare``).
    """
    try:
        yield
    except Exception as e:
        from pipeline.storage.paths import is_remote

        err = store_error(e, str(url), attempts, bare=bare) if is_remote(url) else None
        if err is None or err is e:
            raise
        raise err from e


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
