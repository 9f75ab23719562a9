"""One thin file-system layer for paths that may be fsspec URLs (``s3://``, ``gs://``, ``az://``,
``file://``) or plain local paths.

What accepts a URL: ``dataset.path``, ``cache.dir`` (precompute-teacher writes the cache
there), ``data.train_cache`` / ``data.eval_cache``, ``output_dir`` and ``resume`` (the run
directory: checkpoints, ``best/``, ``final/``, loss logs, metrics), a pretrained
``student.path`` (a previous round's ``final/``), ``inspect-cache`` and ``inspect-losses``.
Model, teacher and tokenizer paths and chat templates stay local: :func:`local_path` refuses a
URL with an error naming the config key, so a URL never silently becomes a local directory
(``Path("s3://b/x")`` is ``s3:/b/x``).

Options of the remote file system (endpoint, region, anonymous access, credentials) come from
fsspec's standard environment variables (``FSSPEC_S3_ENDPOINT_URL``, ``FSSPEC_S3_ANON``...,
see fsspec's configuration docs), the credential chain of the backend (``AWS_ACCESS_KEY_ID``,
``~/.aws``...) and the optional ``storage_options:`` config section (:func:`configure`, which
wins over the environment); credentials are never written into the cache, the run directory,
wandb or the logs (:func:`redact`).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from pipeline.storage.errors import describe, one_line  # noqa: F401  (describe: re-exported)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def scheme(path: str | os.PathLike) -> str | None:
    """The URL scheme of ``path`` (``"s3"``...), or None for a plain path."""
    m = _SCHEME.match(str(path))
    return m.group(1).lower() if m else None


def is_remote(path: str | os.PathLike) -> bool:
    """True for a URL other than ``file://`` (read and written through fsspec)."""
    return scheme(path) not in (None, "file", "local")


URL_KEYS = ("dataset.path, cache.dir, data.train_cache, data.eval_cache, output_dir, resume, a pretrained "
            "student.path, inspect-cache and inspect-losses")
"""What takes a URL, for the error messages."""

SECRET_KEYS = re.compile(r"key|secret|token|password|passwd|credential|sas|signature", re.IGNORECASE)
"""Option names whose values are credentials (``key``, ``secret``, ``token``, ``account_key``,
``sas_token``...): :func:`redact` hides them."""

_OPTIONS: dict[str, dict] = {}


def configure(options: dict[str, dict] | None) -> None:
    """Apply a config's ``storage_options:`` section, ``{protocol: {fsspec option: value}}``
    (e.g. ``{"s3": {"endpoint_url": "http://10.0.0.5:9000", "anon": False}}``), to every file
    system opened afterwards in this process, ours and those opened by datasets, zarr and
    torch.distributed.checkpoint (fsspec's global configuration, ``fsspec.config.conf``). The
    options win over fsspec's environment variables.

    Raises:
        ValueError: a protocol whose options are not a mapping (named).
    """
    import fsspec.config

    for proto, opts in (options or {}).items():
        if not isinstance(opts, dict):
            raise ValueError(f"storage_options.{proto}: expected a mapping of fsspec options, got {opts!r}")
        _OPTIONS[proto] = dict(opts)
    _apply(fsspec.config)


def _apply(config) -> None:
    config.set_conf_env(config.conf)
    for proto, opts in _OPTIONS.items():
        config.conf.setdefault(proto, {}).update(opts)


def redact(options):
    """A copy of ``options`` (nested dicts/lists) with the values of credential-like keys
    (:data:`SECRET_KEYS`) replaced by ``"<redacted>"``: what config.yaml, run.json and wandb get."""
    if isinstance(options, dict):
        return {k: "<redacted>" if isinstance(k, str) and SECRET_KEYS.search(k) and v is not None else redact(v)
                for k, v in options.items()}
    if isinstance(options, list):
        return [redact(v) for v in options]
    return options


def local_path(path: str | os.PathLike, key: str) -> Path:
    """``path`` as a local :class:`~pathlib.Path` (``file://`` stripped).

    Raises:
        ValueError: ``path`` is a remote URL; ``key`` (the config key or argument) is named.
    """
    s = str(path)
    if is_remote(s):
        raise ValueError(f"{key}: {s} is a URL; this path must be local (URLs are taken by {URL_KEYS})")
    if scheme(s) in ("file", "local"):
        s = s.split("://", 1)[1]
    return Path(s)


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...``: with ``/`` for URLs, ``os.path.join`` for local paths."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(local_path(base, "path"), *parts))


def filesystem(path: str | os.PathLike):
    """``(fsspec file system, path inside it)`` for a URL (fsspec's ``url_to_fs``; options from
    fsspec's environment configuration, read at every call so a test's server is seen).

    Raises:
        ValueError: no fsspec implementation for the scheme (e.g. ``s3fs`` not installed); the URL is named.
    """
    import fsspec
    import fsspec.config

    _apply(fsspec.config)
    try:
        return fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as e:
        raise ValueError(f"{path}: no file system for this URL ({one_line(e)})") from None


def check_access(url: str, key: str) -> None:
    """Fail early, in one line naming ``key`` and ``url``, when the store cannot serve a prefix:
    the bucket does not exist, or the store refuses the request (credentials, endpoint). Two
    requests (the bucket, one listing of the prefix); nothing is written.

    Raises:
        ValueError: the bucket is missing or a request failed; names ``key`` and ``url``.
    """
    url = str(url).rstrip("/")
    try:
        remote = Remote(url)
        bucket = remote.root.split("/", 1)[0]
        if not remote.fs.exists(bucket):
            raise ValueError(f"{key} {url}: bucket {bucket!r} does not exist (or is not visible with these "
                             "credentials); create it first (nothing was changed)")
        remote.names()
    except OSError as e:  # refused credentials, unreachable endpoint...
        raise ValueError(f"{key} {url}: the store refused or failed the request ({describe(e)})") from None


def _split(url: str) -> tuple["Remote", str]:
    base, name = str(url).rstrip("/").rsplit("/", 1)
    return Remote(base), name


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of one small file (``config.yaml``, ``run.json``, ``trainer.pt``...): a local
    path or one object on a store.

    Raises:
        FileNotFoundError: there is none.
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


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Replace one small file whole: locally a temporary file renamed over it (a reader sees the
    old or the new file, never part of one; the temporary file is removed on an error), on a
    store one PUT (atomic). The caller wraps it in :func:`pipeline.storage.errors.writing` for the
    one-line error.

    Raises:
        OSError: the write failed (nothing replaced).
    """
    if is_remote(path):
        remote, name = _split(str(path))
        remote.write_bytes(name, data)
        return
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
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

    def exists(self, name: str = "") -> bool:
        """Whether an object or a prefix ``name`` exists (one request)."""
        return self.fs.exists(self.path(name))

    def isfile(self, name: str) -> bool:
        """Whether ``name`` is an object (not a prefix)."""
        return self.fs.isfile(self.path(name))

    def names(self) -> list[str]:
        """Names directly under the prefix (objects and sub-prefixes), sorted; [] if none."""
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False, refresh=True))
        except FileNotFoundError:
            return []

    def read_bytes(self, name: str) -> bytes:
        """The whole object ``name``. Raises FileNotFoundError when there is none."""
        return self.fs.cat_file(self.path(name))

    def write_bytes(self, name: str, data: bytes) -> None:
        """One object, written whole (an object store's PUT is atomic: no temporary name)."""
        self.fs.pipe_file(self.path(name), data)

    def put_dir(self, local: Path, name: str, after_object=None) -> None:
        """Upload a local file or directory tree to ``name`` (objects under their final names,
        one PUT each, in path order). ``after_object(i)`` is called after the i-th object
        (1-based; the crash tests kill the process between two objects of a shard)."""
        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for i, f in enumerate(files, 1):
            rel = "" if f == local else f.relative_to(local).as_posix()
            self.fs.put_file(str(f), self.path(f"{name}/{rel}" if name and rel else name or rel))
            if after_object is not None:
                after_object(i)

    def download_dir(self, name: str, local: Path) -> None:
        """Copy every object under ``name`` into the local directory ``local``."""
        base = self.path(name)
        for p in self.fs.find(base):
            rel = p[len(base):].lstrip("/")
            dst = local / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(p, str(dst))

    def files(self, name: str) -> dict[str, int]:
        """``{relative path: size in bytes}`` of the objects under ``name`` (a single object:
        ``{"": size}``)."""
        base = self.path(name)
        found = self.fs.find(base, detail=True)
        return {p[len(base):].lstrip("/"): int(info.get("size") or 0) for p, info in found.items()}

    def remove(self, name: str) -> None:
        """Delete an object or every object under a prefix (missing: no error)."""
        try:
            self.fs.rm(self.path(name), recursive=True)
        except FileNotFoundError:
            pass

    def open(self, name: str, mode: str = "rb"):
        """A file object; reads are ranged requests with no read-ahead (``cache_type="none"``):
        a reader fetches the row groups it asks for, not whole shards."""
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
