"""URL helpers: which paths are URLs (:func:`is_remote`, :func:`scheme`), joining, the local
form of a path (:func:`local_path`), the fsspec file system of a URL (:func:`filesystem`) and the
store options (:func:`configure`, :func:`redact`). See :mod:`pipeline.storage`."""
from __future__ import annotations

import os
import re
from pathlib import Path

from pipeline.storage.errors import one_line

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
