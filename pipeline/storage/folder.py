"""One object for a directory that is either local or a prefix on an object store
(:class:`Folder`, modelled on datatrove's ``DataFolder``), with the store primitives under it
(:class:`Remote`, :class:`RemotePath`) and the small-file layer (:func:`read_file`,
:func:`write_file`, :func:`file_exists`). The local-vs-store decision is taken here, once:
callers write one body against :class:`Folder`.

Local semantics: a file is written under ``NAME.tmp`` and renamed over ``NAME``; a staged
directory under ``DIR.tmp`` and renamed over ``DIR``. On a store (no rename): one PUT per object
(atomic), a staged directory uploaded with its marker object last.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from pipeline.storage.errors import StoreError, store_error, store_kind, writing
from pipeline.storage.paths import filesystem, is_remote, local_path, scheme


def check_access(url: str, key: str) -> None:
    """Fail early, in one line naming ``key``, ``url`` and the cause, when the store cannot serve
    a prefix: the endpoint is unreachable, the store refuses the credentials, the bucket does not
    exist, or it throttles (:func:`~pipeline.storage.errors.store_cause`). One listing of the
    prefix, tried once (no retries: an unreachable endpoint fails in about a second, not after
    the client's backoff); nothing is written.

    Raises:
        StoreError: the request failed; names ``key``, ``url`` and the cause.
    """
    url = str(url).rstrip("/")
    remote = Remote(url)
    probe = remote.probe()
    bucket = remote.root.split("/", 1)[0]
    try:
        try:
            probe.fs.ls(probe.root, detail=False, refresh=True)
        except FileNotFoundError as e:  # an empty prefix is fine; a missing bucket is not
            found = store_kind(e)
            if found is not None and found[0] == "bucket":
                raise
            if found is None and remote.protocol not in ("s3", "s3a") and not probe.fs.exists(bucket):
                raise StoreError(f"{key} {url}: bucket {bucket!r} does not exist", url, "bucket",
                                 f"bucket {bucket!r} does not exist") from None
    except Exception as e:
        err = store_error(e, url, getattr(probe.fs, "retries", None), key=key)
        if err is None:
            raise
        raise err from None


def _split(url: str) -> tuple["Remote", str]:
    base, name = str(url).rstrip("/").rsplit("/", 1)
    return Remote(base), name


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of one small file (``config.yaml``, ``run.json``, ``trainer.pt``...): a local
    path or one object on a store.

    Raises:
        FileNotFoundError: there is none (on a store a ``StoreNotFound``: ``URL: no such object``).
        StoreError: a store request failed (unreachable endpoint, refused credentials, missing
            bucket, throttling; :func:`~pipeline.storage.errors.store_cause`).
    """
    if is_remote(path):
        remote, name = _split(str(path))
        return remote.read_bytes(name)
    return Path(path).read_bytes()


def file_exists(path: str | os.PathLike) -> bool:
    """Whether one file (local) or object (store) exists at ``path``."""
    if is_remote(path):
        remote, name = _split(str(path))
        return remote.isfile(name)
    return Path(path).is_file()


def write_file(path: str | os.PathLike, data: bytes, tmp_name: str | None = None) -> None:
    """Replace one small file whole: locally a temporary file renamed over it (a reader sees the
    old or the new file, never part of one; the temporary file is removed on an error), on a
    store one PUT (atomic). The caller wraps it in :func:`pipeline.storage.errors.writing` for the
    one-line error.

    Args:
        path: the file (a local path or a URL).
        data: its whole content.
        tmp_name: locally, the temporary file's name in the same directory (default ``NAME.tmp``).
    Raises:
        OSError: the write failed (nothing replaced).
    """
    if is_remote(path):
        remote, name = _split(str(path))
        remote.write_bytes(name, data)
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(tmp_name or p.name + ".tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Remote:
    """A directory-like prefix on a remote store (a cache directory in a bucket).

    Args:
        url: ``s3://bucket/prefix`` (no trailing slash needed).
    Raises:
        ValueError: see :func:`filesystem`.
    """

    def __init__(self, url: str | os.PathLike):
        self.url = str(url).rstrip("/")
        self.fs, self.root = filesystem(self.url)
        self.protocol = scheme(self.url)

    def path(self, name: str = "") -> str:
        """The store path (no scheme) of ``name`` under the prefix."""
        return f"{self.root}/{name}" if name else self.root

    def url_of(self, name: str) -> str:
        """The full URL of ``name`` under the prefix (for messages and zarr)."""
        return f"{self.url}/{name}"

    def probe(self) -> "Remote":
        """This prefix on a file system that tries each request once (S3: botocore retries off),
        for :func:`check_access`: an unreachable endpoint is reported at once. Other protocols:
        ``self``."""
        if type(self.fs).__name__ != "S3FileSystem":
            return self
        opts = dict(getattr(self.fs, "storage_options", {}) or {})
        opts["config_kwargs"] = {**(opts.get("config_kwargs") or {}), "retries": {"total_max_attempts": 1}}
        probe = object.__new__(Remote)
        probe.url, probe.root, probe.protocol = self.url, self.root, self.protocol
        probe.fs = type(self.fs)(**opts, skip_instance_cache=True)
        return probe

    @contextlib.contextmanager
    def _request(self, name: str = "") -> Iterator[None]:
        """A store request on ``name``: its failure becomes a :class:`StoreError` naming the
        URL and the cause (:func:`~pipeline.storage.errors.store_error`; a missing object a
        ``StoreNotFound``, still a ``FileNotFoundError``)."""
        try:
            yield
        except Exception as e:
            err = store_error(e, self.url_of(name) if name else self.url, getattr(self.fs, "retries", None), bare=True)
            if err is None or err is e:
                raise
            raise err from e

    def _missing(self, e: FileNotFoundError) -> bool:
        """Whether ``e`` (a ``FileNotFoundError`` of a request) means a missing object or
        prefix, as opposed to a missing bucket (which is raised)."""
        found = store_kind(e, bare=True)
        return found is None or found[0] == "object"

    def exists(self, name: str = "") -> bool:
        """Whether an object or a prefix ``name`` exists (one or two requests).

        Raises:
            StoreError: the request failed (unreachable endpoint, refused credentials, missing
                bucket, throttling): not taken for "absent".
        """
        with self._request(name):
            try:
                if "/" not in self.path(name):  # the bucket itself
                    self.fs.ls(self.path(name), detail=False, refresh=True)
                else:
                    self.fs.info(self.path(name))
                return True
            except FileNotFoundError as e:
                if not self._missing(e):
                    raise
                return False

    def isfile(self, name: str) -> bool:
        """Whether ``name`` is an object (not a prefix).

        Raises:
            StoreError: the request failed (see :meth:`exists`).
        """
        with self._request(name):
            try:
                return self.fs.info(self.path(name)).get("type") == "file"
            except FileNotFoundError as e:
                if not self._missing(e):
                    raise
                return False

    def names(self) -> list[str]:
        """Names directly under the prefix (objects and sub-prefixes), sorted; [] if none.

        Raises:
            StoreError: the listing failed (see :meth:`exists`).
        """
        with self._request():
            try:
                return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False, refresh=True))
            except FileNotFoundError as e:
                if not self._missing(e):
                    raise
                return []

    def read_bytes(self, name: str) -> bytes:
        """The whole object ``name``.

        Raises:
            StoreNotFound: there is none (a ``FileNotFoundError``: ``URL: no such object``).
            StoreError: the request failed (see :meth:`exists`).
        """
        with self._request(name):
            return self.fs.cat_file(self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """One object, written whole (an object store's PUT is atomic: no temporary name).

        Raises:
            StoreError: the request failed (see :meth:`exists`).
        """
        with self._request(name):
            self.fs.pipe_file(self.path(name), data)

    def put_dir(self, local: Path, name: str, after_object=None) -> None:
        """Upload a local file or directory tree to ``name`` (objects under their final names,
        one PUT each, in path order). ``after_object(i)`` is called after the i-th object
        (1-based; the crash tests kill the process between two objects of a shard)."""
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for i, f in enumerate(files, 1):
            rel = "" if f == local else f.relative_to(local).as_posix()
            target = f"{name}/{rel}" if name and rel else name or rel
            with self._request(target):
                self.fs.put_file(str(f), self.path(target))
            if after_object is not None:
                after_object(i)

    def download_dir(self, name: str, local: Path) -> None:
        """Copy every object under ``name`` into the local directory ``local``."""
        base = self.path(name)
        with self._request(name):
            for p in self.fs.find(base):
                rel = p[len(base):].lstrip("/")
                dst = local / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(p, str(dst))

    def files(self, name: str) -> dict[str, int]:
        """``{relative path: size in bytes}`` of the objects under ``name`` (a single object:
        ``{"": size}``)."""
        base = self.path(name)
        with self._request(name):
            found = self.fs.find(base, detail=True)
        return {p[len(base):].lstrip("/"): int(info.get("size") or 0) for p, info in found.items()}

    def remove(self, name: str) -> None:
        """Delete an object or every object under a prefix (missing: no error)."""
        with self._request(name):
            try:
                self.fs.rm(self.path(name), recursive=True)
            except FileNotFoundError:
                pass

    def open(self, name: str, mode: str = "rb"):
        """A file object; reads are ranged requests with no read-ahead (``cache_type="none"``):
        a reader fetches the row groups it asks for, not whole shards."""
        with self._request(name):
            if "r" in mode:
                return self.fs.open(self.path(name), mode, cache_type="none")
            return self.fs.open(self.path(name), mode)

    def zarr_store(self, name: str, read_only: bool = True):
        """A zarr v3 ``FsspecStore`` on ``name`` (zarr reads its chunks with ranged requests)."""
        from zarr.storage import FsspecStore

        return FsspecStore.from_url(self.url_of(name), read_only=read_only)


def staging_dir() -> tempfile.TemporaryDirectory:
    """A local temporary directory for a shard (or tokenizer) on its way to a remote store."""
    return tempfile.TemporaryDirectory(prefix="kd-upload-")


class RemotePath:
    """One shard (object or prefix) ``name`` under a :class:`Remote` prefix: what a cache backend
    reads when the cache is on a remote store (a local shard is a :class:`~pathlib.Path`)."""

    def __init__(self, remote: Remote, name: str):
        self.remote, self.name = remote, name

    def __str__(self) -> str:
        return self.remote.url_of(self.name)

    def __hash__(self) -> int:
        return hash(str(self))

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(other) == str(self)


_COPIES: dict[str, tempfile.TemporaryDirectory] = {}


def local_copy(url: str) -> str:
    """A local directory holding the objects under ``url`` (downloaded once per process, removed
    at exit): for small directories read whole by libraries that want local files (a tokenizer).

    Raises:
        FileNotFoundError: nothing under ``url`` (named).
    """
    if url not in _COPIES:
        r = Remote(url)
        if not r.files(""):
            raise FileNotFoundError(f"{url}: no such directory on the store")
        tmp = tempfile.TemporaryDirectory(prefix="kd-download-")
        r.download_dir("", Path(tmp.name))
        _COPIES[url] = tmp
    return _COPIES[url].name


class Folder:
    """A directory that is either local or a prefix on an object store: the one place where
    the local-vs-store decision is taken.

    Args:
        path: a local path (``file://`` accepted) or a store URL (``s3://bucket/prefix``).
    Attributes:
        url: the folder as a string (a URL without trailing slash, or the local path).
        remote: the :class:`Remote` prefix on a store, ``None`` for a local directory.
        dir: the local :class:`~pathlib.Path`, ``None`` on a store.
    Raises:
        ValueError: no fsspec implementation for the URL's scheme (see :func:`filesystem`).
    """

    def __init__(self, path: str | os.PathLike):
        if is_remote(path):
            self.remote: Remote | None = Remote(path)
            self.dir: Path | None = None
            self.url = self.remote.url
        else:
            self.remote, self.dir = None, local_path(path, "path")
            self.url = str(path) if isinstance(path, Path) or scheme(path) is None else str(self.dir)

    # ------------------------------------------------------------------ names
    @property
    def is_remote(self) -> bool:
        """True on a store."""
        return self.remote is not None

    @property
    def path(self) -> Path | str:
        """The folder itself: a local :class:`~pathlib.Path`, or the URL on a store."""
        return self.dir if self.dir is not None else self.url

    def join(self, name: str = "") -> Path | str:
        """``name`` under the folder: a local :class:`~pathlib.Path`, or a URL on a store (the
        folder itself for ``""``)."""
        if self.dir is not None:
            return self.dir / name if name else self.dir
        return self.remote.url_of(name) if name else self.url

    def sub(self, name: str) -> "Folder":
        """The folder ``name`` under this one."""
        return Folder(self.join(name))

    def shard(self, name: str) -> Path | RemotePath:
        """What a cache backend reads for the shard ``name``: a local path or a :class:`RemotePath`."""
        return self.dir / name if self.dir is not None else RemotePath(self.remote, name)

    def __str__(self) -> str:
        return self.url

    def absolute(self) -> str:
        """The folder for reports: the URL on a store, the resolved local path."""
        return self.url if self.remote is not None else str(self.dir.resolve())

    # ------------------------------------------------------------------ queries
    def exists(self, name: str = "") -> bool:
        """Whether ``name`` (a file, a directory / an object, a prefix) exists; the folder itself for ``""``."""
        return self.remote.exists(name) if self.remote is not None else self.join(name).exists()

    def isfile(self, name: str) -> bool:
        """Whether ``name`` is a file (an object on a store, not a prefix)."""
        return self.remote.isfile(name) if self.remote is not None else self.join(name).is_file()

    def isdir(self, name: str = "") -> bool:
        """Whether ``name`` is a directory; on a store whether anything exists by that name (one
        request: a prefix and an object are not told apart)."""
        return self.remote.exists(name) if self.remote is not None else self.join(name).is_dir()

    @property
    def nouns(self) -> tuple[str, str]:
        """``("file", "directory")`` locally, ``("object", "prefix")`` on a store: for messages."""
        return ("object", "prefix") if self.remote is not None else ("file", "directory")

    def fs_path(self) -> tuple[object, str]:
        """``(fsspec file system, path inside it)`` on a store; ``(None, local path)`` locally:
        what pyarrow's dataset API takes (``filesystem=``, path)."""
        return (self.remote.fs, self.remote.root) if self.remote is not None else (None, str(self.dir))

    def readable(self, name: str):
        """What a reader library (pyarrow...) takes for the file ``name``: the local path, or on
        a store its bytes (read whole) in a ``BytesIO``.

        Raises:
            FileNotFoundError: (store) there is none.
            StoreError: (store) the request failed (:meth:`Remote.read_bytes`).
        """
        if self.remote is None:
            return self.join(name)
        import io

        return io.BytesIO(self.remote.read_bytes(name))

    def list(self, dirs: bool = False) -> list[str]:
        """Names directly under the folder (files and directories), sorted; [] if it does not
        exist. With ``dirs``, local directories only (on a store every name: telling a prefix
        from an object would cost a request each)."""
        if self.remote is not None:
            return self.remote.names()
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if not dirs or p.is_dir())

    def files(self, name: str = "") -> dict[str, int]:
        """``{relative path: size in bytes}`` of every file under ``name`` (recursively)."""
        if self.remote is not None:
            return self.remote.files(name)
        base = self.join(name)
        if base.is_file():
            return {"": base.stat().st_size}
        return {f.relative_to(base).as_posix(): f.stat().st_size for f in sorted(base.rglob("*")) if f.is_file()}

    # ------------------------------------------------------------------ removal
    def remove(self, name: str = "") -> None:
        """Delete the file or directory (object or prefix) ``name``; the whole folder for ``""``.
        Missing: no error. Errors on a local directory's files are ignored (best effort)."""
        if self.remote is not None:
            self.remote.remove(name)
            return
        p = self.join(name)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def rmtree(self, name: str = "") -> None:
        """Delete the directory (prefix) ``name``, the whole folder for ``""``; unlike
        :meth:`remove`, a local error is raised.

        Raises:
            OSError: (local) it cannot be removed, or does not exist.
        """
        if self.remote is not None:
            self.remote.remove(name)
        else:
            shutil.rmtree(self.join(name))

    def local_paths(self, *names: str) -> tuple[Path, ...]:
        """The local paths of ``names`` (for :func:`~pipeline.storage.errors.writing`'s cleanup);
        ``()`` on a store, where nothing is written under a temporary name."""
        return tuple(self.join(n) for n in names) if self.remote is None else ()

    # ------------------------------------------------------------------ small files
    def read_bytes(self, name: str) -> bytes:
        """The whole file ``name``.

        Raises:
            FileNotFoundError: there is none.
            StoreError: (store) the request failed (:meth:`Remote.read_bytes`).
        """
        return self.remote.read_bytes(name) if self.remote is not None else self.join(name).read_bytes()

    def write_bytes(self, name: str, data: bytes, atomic: bool = True, tmp_name: str | None = None) -> None:
        """Replace the file ``name`` whole (:func:`write_file`: ``NAME.tmp``, or ``tmp_name`` in
        the same directory, renamed over it locally, parent directories created; one PUT on a
        store). With ``atomic=False`` a local file is written in place (for files inside a
        directory that is itself renamed last).

        Raises:
            OSError: the write failed (nothing replaced; the temporary file is removed).
        """
        if atomic or self.remote is not None:
            write_file(self.join(name), data, tmp_name)
        else:
            self.join(name).write_bytes(data)

    @contextlib.contextmanager
    def staged_file(self, name: str, tmp_suffix: str = ".tmp") -> Iterator[Path]:
        """A local path to write the file or directory ``name`` into before :meth:`publish`:
        ``NAME<tmp_suffix>`` next to it locally; on a store ``NAME`` in a local staging
        directory, removed on exit."""
        if self.remote is None:
            yield self.join(name + tmp_suffix)
            return
        with staging_dir() as stage:
            yield Path(stage) / name

    def publish(self, staged: Path, name: str, after_object=None) -> None:
        """Make ``staged`` (from :meth:`staged_file`) the file or directory ``name``: locally a
        rename; on a store an upload under the final names (``after_object(i)`` after the i-th
        object, for the crash tests; never called locally).

        Raises:
            OSError: the rename or an upload failed.
        """
        if self.remote is None:
            os.replace(staged, self.join(name))
        else:
            self.remote.put_dir(staged, name, after_object=after_object)

    @contextlib.contextmanager
    def written_locally(self) -> Iterator[Path]:
        """A local directory to write files into: the folder itself locally (created; files
        appear as written), on a store a staging directory uploaded on exit (not on an error).

        Raises:
            OSError: an upload failed.
        """
        if self.remote is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            yield self.dir
            return
        with staging_dir() as stage:
            yield Path(stage)
            self.remote.put_dir(Path(stage), "")

    def makedirs(self) -> None:
        """Create the local directory and its parents (no-op on a store: prefixes need no creation).

        Raises:
            OSError: it cannot be created.
        """
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ write in place, commit by rename
    def scratch(self, name: str, tmp_name: str) -> "Folder":
        """Where the directory ``name`` is written before :meth:`commit`: ``tmp_name`` locally
        (renamed over ``name`` by :meth:`commit`), ``name`` itself on a store (no rename there:
        the caller writes its marker object last)."""
        return self.sub(tmp_name if self.remote is None else name)

    def cleanup(self) -> tuple[Path, ...]:
        """The local paths that :func:`~pipeline.storage.errors.writing` removes when writing
        this folder fails: the directory itself locally, nothing on a store."""
        return (self.dir,) if self.dir is not None else ()

    def commit(self, name: str, scratch: "Folder") -> None:
        """Make ``scratch`` (from :meth:`scratch`) the directory ``name``: locally the previous
        ``name`` is removed and ``scratch`` renamed over it; no-op on a store.

        Raises:
            OSError: the rename failed.
        """
        if self.remote is None:
            shutil.rmtree(self.join(name), ignore_errors=True)
            os.replace(scratch.dir, self.join(name))

    def open(self, name: str, mode: str = "rb"):
        """A file object on ``name`` (on a store: ranged reads, see :meth:`Remote.open`)."""
        return self.remote.open(name, mode) if self.remote is not None else open(self.join(name), mode)

    # ------------------------------------------------------------------ directories
    @contextlib.contextmanager
    def staged(self, name: str = "", what: str = "directory", marker: str | None = None) -> Iterator[Path]:
        """Write the directory ``name`` (the folder itself for ``""``) whole: yields a local
        path (not created) to write it into; on success it replaces the previous one.

        Locally: ``<dir>.tmp`` (removed first), renamed over ``<dir>`` after the previous one is
        removed. On a store: a local staging directory, uploaded after the previous objects
        under the prefix are removed, with ``marker`` (e.g. ``config.json``) uploaded last.

        Args:
            name: the directory under the folder.
            what: what is written, for the error message.
            marker: the file uploaded last on a store (the commit point), if any.
        Raises:
            StorageError: an I/O error while writing (locally the temporary directory is removed).
        """
        out = self.join(name)
        if self.remote is None:
            tmp = Path(str(out) + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            with writing(what, out, tmp):  # the previous directory stays until the new one is whole
                yield tmp
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
            return
        with staging_dir() as stage:
            tmp = Path(stage) / (Path(name).name or "stage")
            with writing(what, out):
                yield tmp
                remote = Remote(out)
                remote.remove("")
                files = sorted(p for p in tmp.rglob("*") if p.is_file())
                for f in sorted(files, key=lambda p: p.name == marker):
                    remote.put_dir(f, f.relative_to(tmp).as_posix())

    def local(self) -> str:
        """A local directory holding the folder's files: the directory itself, or a copy of
        the objects downloaded once per process (:func:`local_copy`).

        Raises:
            FileNotFoundError: nothing under the store prefix (named).
        """
        return str(self.dir) if self.dir is not None else local_copy(self.url)

    def writer(self):
        """A torch.distributed.checkpoint storage writer for the folder: ``FileSystemWriter``
        locally, ``FsspecWriter`` on a store."""
        if self.remote is None:
            from torch.distributed.checkpoint import FileSystemWriter

            return FileSystemWriter(str(self.dir))
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(self.url)

    def reader(self):
        """A torch.distributed.checkpoint storage reader for the folder: ``FileSystemReader``
        locally, ``FsspecReader`` on a store."""
        if self.remote is None:
            from torch.distributed.checkpoint import FileSystemReader

            return FileSystemReader(str(self.dir))
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(self.url)

    def dcp_target(self, kind: str) -> dict:
        """The ``dcp.save``/``dcp.load`` keyword for the folder: ``checkpoint_id`` locally, an
        fsspec storage writer (``kind="writer"``) or reader (``"reader"``) on a store (DCP would
        take a URL string for a local path)."""
        if self.remote is None:
            return {"checkpoint_id": str(self.dir)}
        return {"storage_writer": self.writer()} if kind == "writer" else {"storage_reader": self.reader()}

    def zarr_store(self, name: str, read_only: bool = True):
        """A zarr store on ``name``: the local path, or an ``FsspecStore`` on a store."""
        return str(self.join(name)) if self.remote is None else self.remote.zarr_store(name, read_only)

    def check_access(self, key: str) -> None:
        """Fail early when a store cannot serve the prefix (:func:`check_access`); no-op locally.

        Raises:
            StoreError: the request failed (unreachable endpoint, refused credentials, missing
                bucket, throttling); names ``key``, the URL and the cause.
        """
        if self.remote is not None:
            check_access(self.url, key)
