"""The generated dataset on disk: its manifest header, preparing (fresh, resumed, overwritten),
atomic shards, and the final manifest (format: :mod:`pipeline.data.generated`).

Life cycle: rank 0 prepares the directory (:func:`prepare_output`) and every rank learns the
prompt IDs already in closed shards; each rank writes its own shards (:func:`write_shard`:
one parquet file each, written under a temporary name and renamed, or one PUT on a store, so
a shard exists whole or not at all); after a barrier rank 0 rebuilds the counts from the
shards and writes ``generation.json`` with ``complete: true`` (:func:`finalize_output`),
the last thing written.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass

from pipeline.data.generated import FORMAT, FORMAT_VERSION, MANIFEST, arrow_schema, read_generation_manifest
from pipeline.storage import Folder
from pipeline.storage.errors import writing

SHARD_RE = re.compile(r"^part-r(\d+)-a(\d+)-(\d+)\.parquet$")
"""Names of closed shards: ``part-r{rank:05d}-a{attempt:03d}-{n:05d}.parquet``."""

HEADER_KEYS = ("model_fingerprint", "tokenizer_fingerprint", "vocab_size", "sampling", "prompt_tokens", "batch_size",
               "dataset_fingerprint", "prompt_format")
"""Manifest keys that must match for a rerun to resume an existing dataset (the model's weights,
tokenizer, sampling, prompts and batch composition: what the rows depend on)."""


@dataclass(frozen=True)
class ResumeState:
    """What :func:`prepare_output` tells every rank.

    Attributes:
        done: prompt IDs whose rows are in closed shards (their batches are skipped).
        attempt: this run's attempt number (0 for a fresh dataset), part of its shard names.
    """

    done: frozenset
    attempt: int


def shard_name(rank: int, attempt: int, n: int) -> str:
    """The file name of shard ``n`` of ``rank`` in attempt ``attempt``."""
    return f"part-r{rank:05d}-a{attempt:03d}-{n:05d}.parquet"


def _closed_shards(folder: Folder) -> list[str]:
    """Names of the closed shards under ``folder``, sorted."""
    return [n for n in folder.list() if SHARD_RE.match(n)]


def _read_columns(folder: Folder, name: str, columns: list[str]):
    """The ``columns`` of the shard ``name`` as a ``pyarrow.Table``.

    Raises:
        ValueError: the shard is not readable parquet (named).
    """
    import pyarrow.parquet as pq

    try:
        return pq.read_table(folder.readable(name), columns=columns)
    except (OSError, ValueError) as e:
        raise ValueError(f"generated dataset {folder.join(name)}: unreadable shard ({str(e).splitlines()[0]}); "
                         "delete it and rerun to regenerate its rows") from e


def _check_header(folder: Folder, old: dict, header: dict) -> None:
    """Refuse to resume a dataset whose rows were generated differently.

    Raises:
        ValueError: the first :data:`HEADER_KEYS` entry that differs, both values named.
    """
    for key in HEADER_KEYS:
        if old.get(key) != header[key]:
            raise ValueError(f"output_dir {folder} holds completions generated with {key}={old.get(key)!r}, this "
                             f"config gives {header[key]!r}; use another output_dir or set overwrite: true")


def prepare_output(output_dir: str, header: dict, overwrite: bool) -> ResumeState:
    """Create or resume the generated dataset at ``output_dir`` (rank 0 only; run through
    :func:`~pipeline.distributed.on_rank0`): check a previous manifest's header, delete
    leftover temporary files, collect the prompt IDs of closed shards, and write the manifest
    with ``complete: false`` and the attempt count.

    Raises:
        ValueError: a non-empty directory without ``generation.json`` (never touched), a
            manifest of other settings (:func:`_check_header`), an unreadable shard, or an
            ``OSError`` as one line naming ``output_dir``.
    """
    folder = Folder(output_dir)
    old = read_generation_manifest(output_dir)
    if old is None and folder.list():
        raise ValueError(f"output_dir {folder} is not empty and holds no {MANIFEST}: not a generated dataset, "
                         "refusing to write into it")
    try:
        if old is not None and overwrite:
            folder.remove("")
            old = None
        if old is not None:
            _check_header(folder, old, header)
        for name in folder.list():
            if name.endswith(".tmp"):
                folder.remove(name)
        done = set()
        for name in _closed_shards(folder):
            done.update(_read_columns(folder, name, ["prompt_id"]).column("prompt_id").to_pylist())
        attempt = int(old.get("attempts", 0)) if old is not None else 0
        write_manifest(folder, {**header, "complete": False, "attempts": attempt + 1})
    except OSError as e:
        raise ValueError(f"output_dir {folder}: cannot be written ({e})") from e
    return ResumeState(frozenset(done), attempt)


def write_manifest(folder: Folder, manifest: dict) -> None:
    """Write ``generation.json`` atomically (temporary file + rename; one PUT on a store).

    Raises:
        StorageError: an I/O error (disk full...), naming the file.
    """
    with writing("manifest", folder.join(MANIFEST)):
        folder.write_bytes(MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def write_shard(folder: Folder, name: str, rows: list[dict]) -> None:
    """Write ``rows`` (dicts with the columns of :data:`~pipeline.data.generated.COLUMNS`) as the
    parquet file ``name`` under ``folder``, atomically: encoded in memory, then
    :meth:`~pipeline.storage.Folder.write_bytes` (``NAME.tmp`` renamed locally, one PUT on a
    store), so a crash leaves the shard whole or absent.

    Raises:
        StorageError: an I/O error (disk full...), naming the shard; nothing is left under its name.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema()
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    with writing("generated shard", folder.join(name), *folder.local_paths(name + ".tmp")):
        folder.write_bytes(name, buf.getvalue())


def finalize_output(output_dir: str, skipped_prompts: int, num_source_rows: int) -> dict:
    """Rebuild the counts from the closed shards and write the manifest with ``complete: true``
    (rank 0, after every rank has closed its shards).

    Returns:
        The final manifest: the header plus ``shards`` (file, rows), ``num_rows``,
        ``num_prompts``, ``num_prompt_tokens``, ``num_completion_tokens``, ``finish_reasons``
        (``{eos: n, length: n}``), ``skipped_prompts``, ``num_source_rows``, ``complete``.
    Raises:
        ValueError: an unreadable shard, or a row ID in two shards (both named).
        StorageError: the manifest could not be written.
    """
    import pyarrow.compute as pc

    folder = Folder(output_dir)
    manifest = read_generation_manifest(output_dir)
    seen: dict[str, str] = {}
    shards, prompts = [], set()
    counts = {"num_rows": 0, "num_prompt_tokens": 0, "num_completion_tokens": 0}
    reasons = {"eos": 0, "length": 0}
    for name in _closed_shards(folder):
        t = _read_columns(folder, name, ["id", "prompt_id", "prompt_ids", "completion_ids", "finish_reason"])
        for rid in t.column("id").to_pylist():
            if rid in seen:
                raise ValueError(f"generated dataset {folder}: row {rid!r} is in two shards ({seen[rid]}, {name})")
            seen[rid] = name
        prompts.update(t.column("prompt_id").to_pylist())
        counts["num_rows"] += t.num_rows
        counts["num_prompt_tokens"] += int(pc.sum(pc.list_value_length(t.column("prompt_ids"))).as_py() or 0)
        counts["num_completion_tokens"] += int(pc.sum(pc.list_value_length(t.column("completion_ids"))).as_py() or 0)
        for r in t.column("finish_reason").to_pylist():
            reasons[r] = reasons.get(r, 0) + 1
        shards.append({"file": name, "rows": t.num_rows})
    manifest.update(counts, num_prompts=len(prompts), finish_reasons=reasons, skipped_prompts=skipped_prompts,
                    num_source_rows=num_source_rows, shards=shards, complete=True)
    write_manifest(folder, manifest)
    return manifest


def new_header(model_path: str, model_fp: str, tokenizer_fp: str, vocab: int, sampling: dict, prompt_tokens: int,
               batch_size: int, dataset: dict, dataset_fp: str, prompt_format: str) -> dict:
    """The manifest's header: format, generating model and tokenizer, sampling, prompts. The
    keys of :data:`HEADER_KEYS` must match for a rerun to resume."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "generator": "generate-completions",
            "model": {"path": model_path, "fingerprint": model_fp}, "model_fingerprint": model_fp,
            "tokenizer_fingerprint": tokenizer_fp, "vocab_size": vocab, "sampling": sampling,
            "prompt_tokens": prompt_tokens, "batch_size": batch_size, "prompt_format": prompt_format,
            "dataset": dataset, "dataset_fingerprint": dataset_fp}
