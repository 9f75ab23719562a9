"""Loading a dataset's raw rows with ``datasets``: a ``save_to_disk`` directory, json / jsonl /
parquet / txt / csv files (local or on a store) or a hub name (:func:`load_rows`), and the
readers that turn an unreadable local file into one error naming the file and, where there is
one, the line or row.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import DatasetConfig
from pipeline.storage import Folder, is_remote
from pipeline.storage.errors import describe, store_error


def load_rows(cfg: DatasetConfig):
    """The rows of ``cfg.split`` as a ``datasets.Dataset`` (first ``num_samples`` if set).

    ``cfg.path`` may be a ``save_to_disk`` directory (Dataset or DatasetDict), a
    json/jsonl/parquet/txt/csv file or a directory of such files (local, or a URL on a store:
    :func:`_load_remote`), a hub name, or a generated dataset (a directory holding
    ``generation.json``: its shards' rows in the manifest's order, :func:`_load_generated`; the
    split is ignored).

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        KeyError: the split is not in the dataset.
        ValueError: a local file or ``save_to_disk`` directory that cannot be read (see
            :func:`_read_files`, :func:`_read_saved`): the file and, where there is one, the
            line or row are named.
    """
    import datasets

    from pipeline.data.generated import read_generation_manifest

    generated = read_generation_manifest(cfg.path)
    if generated is not None or cfg.format == "generated":
        ds = _load_generated(cfg, generated)
        return ds.select(range(min(cfg.num_samples, len(ds)))) if cfg.num_samples is not None else ds
    if is_remote(cfg.path):
        ds = _load_remote(cfg)
        if cfg.num_samples is not None:
            ds = ds.select(range(min(cfg.num_samples, len(ds))))
        return ds
    p = Path(cfg.path)
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        ds = _read_saved(p)
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise KeyError(f"dataset {p} has no split {cfg.split!r} (has {sorted(ds)})")
            ds = ds[cfg.split]
    elif p.exists():
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
        ext = files[0].suffix.lstrip(".") if files else ""
        builder = _BUILDERS.get(ext)
        if builder is None:
            raise ValueError(f"dataset {p}: cannot tell the format of {files[:1]} (json, jsonl, parquet, txt, csv)")
        kwargs = {"sample_by": cfg.sample_by} if builder == "text" else {}
        ds = _read_files(p, builder, files, kwargs)
    elif cfg.path.startswith((".", "/", "~")) or cfg.path.count("/") > 1:
        raise FileNotFoundError(f"dataset path not found: {cfg.path}")
    else:
        ds = datasets.load_dataset(cfg.path, split=cfg.split)
    if cfg.num_samples is not None:
        ds = ds.select(range(min(cfg.num_samples, len(ds))))
    return ds


def _load_generated(cfg: DatasetConfig, manifest: dict | None):
    """The rows of a complete generated dataset (:mod:`pipeline.data.generated`): its parquet
    shards, in the manifest's order.

    Raises:
        FileNotFoundError: ``format: generated`` without a manifest.
        ValueError: an incomplete dataset, no rows, or a shard that cannot be read (named).
    """
    import datasets

    from pipeline.data.generated import generated_files

    files = generated_files(cfg, manifest)
    if not files:
        raise ValueError(f"dataset {cfg.path}: the generated dataset has no rows")
    if Folder(cfg.path).is_remote:
        with _QuietDatasets():
            try:
                return datasets.load_dataset("parquet", data_files=files, split="train")
            except _load_errors() as e:
                raise ValueError(f"dataset {cfg.path}: cannot be read as parquet ({_root_cause(e)})") from e
    return _read_files(Path(cfg.path), "parquet", [Path(f) for f in files], {})


_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "txt": "text", "csv": "csv"}


def _load_remote(cfg: DatasetConfig):
    """Rows from a URL (``s3://bucket/data/train.jsonl``, a prefix of such files, or a
    ``save_to_disk`` prefix), read by ``datasets`` through fsspec (options: the environment and
    ``storage_options:``, fsspec's global configuration). ``datasets`` copies the files into its
    local cache once; the rows are then memory-mapped as for a local file.

    Raises:
        FileNotFoundError: nothing at the URL (named).
        StoreError: the listing failed: unreachable endpoint, refused credentials, missing
            bucket, throttling (``dataset.path``, the URL and the cause named).
        ValueError: files of an unknown format (named), or another listing failure.
        KeyError: the split is not in a saved DatasetDict.
    """
    import datasets

    from pipeline.storage import Remote

    url = cfg.path.rstrip("/")
    try:
        remote = Remote(url)
        found = remote.files("")
    except FileNotFoundError:
        found = {}
    except (OSError, ValueError) as e:
        err = store_error(e, url, key="dataset.path")  # unreachable endpoint, refused credentials...: the cause
        raise err if err is not None else ValueError(f"dataset {url}: cannot be listed ({describe(e)})") from None
    if not found:
        raise FileNotFoundError(f"dataset path not found: {url} (no object or prefix there)")
    with _QuietDatasets():
        if "dataset_info.json" in found or "dataset_dict.json" in found:
            ds = datasets.load_from_disk(url)
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise KeyError(f"dataset {url} has no split {cfg.split!r} (has {sorted(ds)})")
                ds = ds[cfg.split]
            return ds
        files = [url] if list(found) == [""] else [f"{url}/{k}" for k in sorted(found) if found[k] and "/" not in k]
        builder = _BUILDERS.get(files[0].rsplit(".", 1)[-1] if files else "")
        if builder is None:
            raise ValueError(f"dataset {url}: cannot tell the format of {files[:1]} (json, jsonl, parquet, txt, csv)")
        kwargs = {"sample_by": cfg.sample_by} if builder == "text" else {}
        try:
            return datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
        except _load_errors() as e:
            raise ValueError(f"dataset {url}: cannot be read as {builder} ({_root_cause(e)})") from e


# ----------------------------------------------------------------------------- unreadable inputs
# ``datasets`` reports a bad local file as ``DatasetGenerationError: An error occurred while
# generating the dataset`` (the cause chained below it) or as a bare pyarrow/pandas error, and logs
# its own error lines on stderr. These readers silence that logging, catch the errors the builders
# raise, and re-raise them as one ValueError naming the file and, where there is one, the line.
def _load_errors() -> tuple[type[BaseException], ...]:
    """What the file builders raise on bad input: their wrapper, pyarrow's errors, ValueError
    (pandas parser errors, "corresponds to no data"), StopIteration (an empty JSON file)."""
    import pyarrow as pa
    from datasets.exceptions import DatasetGenerationError

    return DatasetGenerationError, pa.ArrowException, ValueError, StopIteration


class _QuietDatasets:
    """Raise the ``datasets`` logger to CRITICAL inside the block (its "Failed to load JSON from
    file ..." lines would precede our one-line error)."""

    def __enter__(self):
        import datasets

        self.level = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)

    def __exit__(self, *exc):
        import datasets

        datasets.logging.set_verbosity(self.level)


def _root_cause(e: BaseException) -> str:
    """``Type: first line`` of the innermost chained exception (what the builder actually hit)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    return describe(e, first=True)


def _utf8_problem(f: Path, data: bytes) -> str | None:
    """Where ``data`` stops being UTF-8: ``file line L (byte offset B): ...``, or None."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return f"{f} line {line} (byte offset {e.start}): not UTF-8 text (byte 0x{data[e.start]:02x}: {e.reason})"
    return None


def _json_problem(f: Path, text: str) -> str | None:
    """The first unreadable record of a JSON Lines file (1-based line number), or the position of
    the syntax error of a whole-file JSON document; None if the file parses."""
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if not lines:
        return f"{f}: holds no JSON records (only blank lines)"
    try:
        json.loads(lines[0][1])
        per_line = True  # the first line is a record by itself: JSON Lines
    except ValueError:
        per_line = False
    if per_line:
        for i, ln in lines:
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                return f"{f} line {i}: invalid JSON ({e.msg} at column {e.colno})"
            if not isinstance(obj, dict):
                return f"{f} line {i}: a JSON {type(obj).__name__}, expected an object (one record per line)"
        return None
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        return f"{f} line {e.lineno} column {e.colno}: invalid JSON ({e.msg})"
    return None


def _file_problem(f: Path, builder: str) -> str | None:
    """What is wrong with one data file for ``builder`` (json, text, csv, parquet), or None
    when this check finds nothing (the builder's own message is used then)."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            pq.read_table(f)
        except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError, thrift errors OSError
            return f"{f}: not a readable parquet file ({str(e).strip().splitlines()[0]})"
        return None
    data = f.read_bytes()
    problem = _utf8_problem(f, data)
    if problem is None and builder == "json":
        problem = _json_problem(f, data.decode("utf-8"))
    return problem


def _read_files(p: Path, builder: str, files: list[Path], kwargs: dict):
    """``datasets.load_dataset(builder, data_files=files)``, or a ValueError naming the bad file.

    Raises:
        ValueError: an empty (0-byte) file; a file the builder cannot read: invalid JSON (the
            line), bytes that are not UTF-8 (line and byte offset), a malformed csv (the
            parser's line), a file that is not parquet, or no rows at all.
    """
    import datasets

    for f in files:
        if f.stat().st_size == 0:
            raise ValueError(f"dataset {f}: empty file (0 bytes)")
    try:
        with _QuietDatasets():
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **kwargs)
    except _load_errors() as e:
        for f in files:
            problem = _file_problem(f, builder)
            if problem is not None:
                raise ValueError(f"dataset {problem}") from e
        where = str(files[0]) if len(files) == 1 else f"{p} ({len(files)} files)"
        raise ValueError(f"dataset {where}: cannot be read as {builder} ({_root_cause(e)})") from e


def _read_saved(p: Path):
    """``datasets.load_from_disk(p)``, or a ValueError naming the unreadable file in it."""
    import datasets
    import pyarrow as pa

    try:
        with _QuietDatasets():
            return datasets.load_from_disk(str(p))
    except (*_load_errors(), OSError, KeyError) as e:
        for f in sorted(p.rglob("*.json")):
            try:
                json.loads(f.read_text())
            except ValueError as je:  # JSONDecodeError, UnicodeDecodeError
                raise ValueError(f"dataset {f}: invalid JSON ({je})") from e
        for f in sorted(p.rglob("*.arrow")):
            try:
                with pa.memory_map(str(f)) as src:
                    pa.ipc.open_stream(src).read_all()
            except (OSError, ValueError) as ae:
                raise ValueError(f"dataset {f}: unreadable arrow file, truncated or corrupt ({ae})") from e
        raise ValueError(f"dataset {p}: not a readable save_to_disk directory ({_root_cause(e)})") from e
