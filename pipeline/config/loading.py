"""Config loading: the section base class, YAML + ``key.sub=value`` overrides, one-line
validation errors naming the dotted key, the URL/local path validators every section uses, and
the resolved config written next to every output."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.storage import URL_KEYS, configure, is_remote, local_path, redact, scheme, write_file


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key, file or value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _local_only(value: str | None) -> str | None:
    """Refuse a remote URL for a path that is read or written as a local file (a URL must never
    become a local directory: ``Path("s3://b/x")`` is ``s3:/b/x``). What takes URLs:
    :data:`pipeline.storage.URL_KEYS`."""
    if value is not None and is_remote(value):
        raise ValueError(f"{value} is a URL; this path must be local (URLs are taken by {URL_KEYS})")
    return value


def _file_url_to_path(value: str | None) -> str | None:
    """``file:///data/x`` → ``/data/x`` (local files are read as paths everywhere)."""
    if value is not None and scheme(value) in ("file", "local"):
        return str(local_path(value, "path"))
    return value


StorageOptions = dict[str, dict[str, object]]
"""``storage_options:`` ``{protocol: {fsspec option: value}}``, e.g. ``{s3: {endpoint_url:
"http://10.0.0.5:9000", client_kwargs: {region_name: eu-west-1}}}``: options of the file system
of every URL in the config (s3fs, gcsfs, adlfs options). Applied when the config is validated
(:func:`pipeline.storage.configure`); credential-like values (``key``, ``secret``, ``token``...)
are redacted in config.yaml and wandb (:func:`pipeline.storage.redact`): prefer the backend's
environment variables or credential files for them."""


def _apply_storage_options(value: StorageOptions) -> StorageOptions:
    configure(value)
    return value


T = TypeVar("T", bound=BaseModel)


def _set_dotted(tree: dict, dotted: str, value: object) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    got = first.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    msg = first["msg"].replace("Value error, ", "")
    return f"{source}: config key '{key}': {msg}{got_s}{more}"


def read_yaml_mapping(path: str | os.PathLike) -> dict:
    """A YAML file whose top level is a mapping, as a dict (an empty file: ``{}``).

    Raises:
        ConfigError: no such file, invalid YAML, or a top level that is not a mapping (file named).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return tree


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: list[str] = ()) -> T:
    """Read a YAML config, apply ``key.sub=value`` overrides and validate it.

    Override values are parsed as YAML scalars (``lr=3e-4`` is a float, ``name=null`` None).

    Raises:
        ConfigError: missing/unreadable file, malformed override, unknown key or wrong type;
            the one-line message names the file and the dotted key.
    """
    source = str(path) if path else "<overrides>"
    tree: dict = read_yaml_mapping(path) if path else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def config_dict(cfg: BaseModel) -> dict:
    """The resolved config as plain data with credentials redacted (``storage_options``): what
    goes into config.yaml and to wandb."""
    tree = cfg.model_dump(mode="json")
    if "storage_options" in tree:
        tree["storage_options"] = redact(tree["storage_options"])
    return tree


def dump_config(cfg: BaseModel, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, credentials redacted (:func:`config_dict`): atomically
    (temporary file, then rename), or one PUT when ``path`` is a URL."""
    write_file(path, yaml.safe_dump(config_dict(cfg), sort_keys=False).encode())
