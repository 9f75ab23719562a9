"""Samples: loading rows with ``datasets``, tokenizing, stable sample IDs.

A :class:`Sample` is the record that crosses the stage boundary (DESIGN.md, Samples):
position ``t`` predicts token ``t+1`` and is a valid position iff ``loss_mask[t+1]``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from pipeline.config import DatasetConfig
from pipeline.storage import is_remote
from pipeline.storage.errors import describe


@dataclass(frozen=True)
class Sample:
    """One tokenized dataset row.

    Attributes:
        sample_id: unique string ID within a cache.
        input_ids: (T,) int32 token IDs, BOS included when the tokenizer adds one.
        loss_mask: (T,) bool, True for tokens trained on as targets.
    """

    sample_id: str
    input_ids: np.ndarray
    loss_mask: np.ndarray

    @property
    def n_valid(self) -> int:
        """Number of valid positions (targets), ``loss_mask[1:].sum()``."""
        return int(self.loss_mask[1:].sum())


def load_rows(cfg: DatasetConfig):
    """The rows of ``cfg.split`` as a ``datasets.Dataset`` (first ``num_samples`` if set).

    ``cfg.path`` may be a ``save_to_disk`` directory (Dataset or DatasetDict), a
    json/jsonl/parquet/txt/csv file or a directory of such files (local, or a URL on a store:
    :func:`_load_remote`), or a hub name.

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        KeyError: the split is not in the dataset.
        ValueError: a local file or ``save_to_disk`` directory that cannot be read (see
            :func:`_read_files`, :func:`_read_saved`): the file and, where there is one, the
            line or row are named.
    """
    import datasets

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


_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "txt": "text", "csv": "csv"}


def _load_remote(cfg: DatasetConfig):
    """Rows from a URL (``s3://bucket/data/train.jsonl``, a prefix of such files, or a
    ``save_to_disk`` prefix), read by ``datasets`` through fsspec (options: the environment and
    ``storage_options:``, fsspec's global configuration). ``datasets`` copies the files into its
    local cache once; the rows are then memory-mapped as for a local file.

    Raises:
        FileNotFoundError: nothing at the URL (named).
        ValueError: no store access, or files of an unknown format (named).
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
        raise ValueError(f"dataset {url}: cannot be listed ({describe(e)})") from None
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


ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
                "chatgpt": "assistant", "bot": "assistant", "system": "system", "tool": "tool", "function": "tool",
                "observation": "tool", "ipython": "tool"}
"""Chat roles as the chat template sees them, from OpenAI-style ``role`` or ShareGPT ``from`` values."""


def resolve_format(cfg: DatasetConfig, columns: list[str]) -> tuple[str, str | None]:
    """``(format, chat column)`` for ``cfg.format`` on a dataset with these columns.

    ``auto``: ``chat`` when a ``messages`` (else ``conversations``) column exists (or
    ``messages_field`` is set), ``prompt_response`` when ``prompt_field`` and ``response_field``
    both exist, ``text`` otherwise.

    Raises:
        KeyError: a configured column is missing (the columns are listed).
    """
    fmt = cfg.format
    chat_col = cfg.messages_field or next((c for c in ("messages", "conversations") if c in columns), None)
    if fmt == "auto":
        if cfg.messages_field or chat_col is not None:
            fmt = "chat"
        elif cfg.prompt_field in columns and cfg.response_field in columns:
            fmt = "prompt_response"
        else:
            fmt = "text"
    needed = {"text": list(_text_fields(cfg)), "chat": [chat_col or "messages"],
              "prompt_response": [cfg.prompt_field, cfg.response_field]}[fmt] + ([cfg.id_field] if cfg.id_field else [])
    for field in needed:
        if field not in columns:
            raise KeyError(f"dataset {cfg.path}: no column {field!r} for format {fmt} (columns: {columns})")
    return fmt, chat_col if fmt == "chat" else None


def _text_fields(cfg: DatasetConfig) -> list[str]:
    return [cfg.text_field] if isinstance(cfg.text_field, str) else list(cfg.text_field)


def _row_error(cfg: DatasetConfig, row: int, sid: str, msg: str) -> ValueError:
    return ValueError(f"dataset {cfg.path} row {row} (sample_id {sid!r}): {msg}")


def _str_value(cfg: DatasetConfig, row: int, sid: str, field: str, value) -> str:
    """A text cell: None counts as empty; anything but a string is an error naming the row."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _row_error(cfg, row, sid, f"field {field!r} is {type(value).__name__}, expected a string")
    return value


def _chat_template(cfg: DatasetConfig, tokenizer) -> str:
    """The Jinja template: ``cfg.chat_template`` (a string or a file path) or the tokenizer's own."""
    t = cfg.chat_template
    if t is not None and "{" not in t:
        p = Path(t)
        if not p.is_file():
            raise FileNotFoundError(f"dataset.chat_template: file not found: {t}")
        t = p.read_text()
    t = t or getattr(tokenizer, "chat_template", None)
    if not t:
        raise ValueError(f"dataset {cfg.path}: format chat needs a chat template, and the tokenizer has none "
                         "(set dataset.chat_template to a Jinja string or file)")
    return t


def _messages(cfg: DatasetConfig, row: int, sid: str, conv) -> list[dict]:
    """Normalised ``[{role, content}]`` from OpenAI-style or ShareGPT-style messages."""
    if not isinstance(conv, list) or not conv:
        raise _row_error(cfg, row, sid, f"chat messages must be a non-empty list, got {type(conv).__name__}")
    out = []
    for j, m in enumerate(conv):
        if not isinstance(m, dict):
            raise _row_error(cfg, row, sid, f"message {j} is {type(m).__name__}, expected a mapping")
        role = m.get("role") if m.get("role") is not None else m.get("from")
        content = m.get("content") if m.get("content") is not None else m.get("value")
        if role not in ROLE_ALIASES:
            raise _row_error(cfg, row, sid, f"message {j} has unknown role {role!r} (known: {sorted(ROLE_ALIASES)})")
        if not isinstance(content, str):
            raise _row_error(cfg, row, sid, f"message {j} content is {type(content).__name__}, expected a string")
        out.append({"role": ROLE_ALIASES[role], "content": content})
    return out


def render_chat(tokenizer, messages: list[dict], template: str, where: str = "") -> tuple[list[int], np.ndarray]:
    """Token IDs of a conversation rendered with ``template`` and its assistant-only loss mask.

    Assistant message ``i`` owns the characters from the end of
    ``render(messages[:i], add_generation_prompt=True)`` (the assistant header is context) to
    the end of ``render(messages[:i+1])`` (its content and end-of-turn markup are targets). A
    token is a target iff its character span (tokenizer offsets) overlaps an assistant span.
    The text is tokenized without adding special tokens when the template already writes BOS.

    Args:
        messages: ``[{role, content}]`` with roles ``system|user|assistant|tool``.
    Returns:
        (input_ids list of T ints, loss_mask (T,) bool).
    Raises:
        ValueError (prefixed with ``where``): the template does not render a conversation's
            prefix as a prefix of the whole (assistant tokens cannot be located), or a slow
            tokenizer without offsets.
    """
    def render(msgs: list[dict], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)

    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = render(messages[:i], gen=True) if i else render([], gen=True), render(messages[: i + 1])
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise ValueError(f"{where}the chat template does not render message {i}'s prefix of the conversation as a "
                             "prefix of the whole, so the assistant tokens cannot be located")
        spans.append((len(start), len(end)))
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{where}format chat needs a fast tokenizer (character offsets)")
    bos = tokenizer.bos_token
    enc = tokenizer(full, add_special_tokens=not (bos and full.startswith(bos)), return_offsets_mapping=True)
    mask = np.zeros(len(enc["input_ids"]), dtype=bool)
    for t, (s, e) in enumerate(enc["offset_mapping"]):
        mask[t] = e > s and any(s < se and e > ss for ss, se in spans)
    return list(enc["input_ids"]), mask


def fit_length(input_ids, loss_mask: np.ndarray, cfg: DatasetConfig, bos_token_id: int | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Apply ``cfg.max_length`` / ``overflow`` / ``stride`` to one tokenized row.

    ``truncate`` keeps the first ``max_length`` tokens. ``window`` repeats the leading BOS (when
    ``input_ids[0] == bos_token_id``) and slides a window of ``L = max_length - len(prefix)``
    body tokens by ``s = stride or L``; body tokens already targets in an earlier window are
    context only (mask False), so each target token is a target exactly once.

    Returns:
        [(input_ids (T,) int32, loss_mask (T,) bool), ...] with ``T <= max_length``.
    """
    ids = np.asarray(input_ids, dtype=np.int32)
    mask = np.asarray(loss_mask, dtype=bool)
    n = cfg.max_length
    if len(ids) <= n:
        return [(ids, mask)]
    if cfg.overflow == "truncate":
        return [(ids[:n], mask[:n])]
    p = 1 if bos_token_id is not None and ids[0] == bos_token_id else 0
    body, bmask = ids[p:], mask[p:]
    L = n - p
    step = min(cfg.stride or L, L)
    out, start, covered = [], 0, 0
    while True:
        end = min(start + L, len(body))
        m = bmask[start:end].copy()
        m[: max(0, covered - start)] = False
        out.append((np.concatenate([ids[:p], body[start:end]]), np.concatenate([mask[:p], m])))
        covered = end
        if end >= len(body):
            return out
        start += step


def _encode_rows(ds, tokenizer, cfg: DatasetConfig, fmt: str, chat_col: str | None, ids: list[str],
                 start: int = 0) -> list:
    """Per row ``(input_ids, loss_mask)`` before the length limit (text rows are truncated here
    by the tokenizer itself when ``overflow: truncate``, which keeps any EOS it appends).
    ``ds`` holds rows ``start, start+1, ...`` of the dataset (errors name those row numbers)."""
    if fmt == "text":
        fields = _text_fields(cfg)
        cols = [ds[f][:] for f in fields]  # lists (datasets >= 4 returns lazy Columns)
        texts = [cfg.text_join.join(v for v in (_str_value(cfg, start + i, ids[i], f, x) for f, x in zip(fields, vals)) if v)
                 for i, vals in enumerate(zip(*cols))]
        trunc = cfg.overflow == "truncate"
        enc = tokenizer(texts, truncation=trunc, max_length=cfg.max_length if trunc else None, add_special_tokens=True,
                        return_attention_mask=False)
        return [(toks, np.ones(len(toks), dtype=bool)) for toks in enc["input_ids"]]
    if fmt == "prompt_response":
        prompts = [_str_value(cfg, start + i, ids[i], cfg.prompt_field, x) for i, x in enumerate(ds[cfg.prompt_field][:])]
        responses = [_str_value(cfg, start + i, ids[i], cfg.response_field, x) for i, x in enumerate(ds[cfg.response_field][:])]
        p_ids = tokenizer(prompts, add_special_tokens=True, return_attention_mask=False)["input_ids"]
        r_ids = tokenizer(responses, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        return [(p + r + eos, np.concatenate([np.zeros(len(p), bool), np.ones(len(r) + len(eos), bool)])) if r
                else (p, np.zeros(len(p), bool)) for p, r in zip(p_ids, r_ids)]
    template = _chat_template(cfg, tokenizer)
    out = []
    for i, conv in enumerate(ds[chat_col][:]):
        where = f"dataset {cfg.path} row {start + i} (sample_id {ids[i]!r}): "
        try:
            out.append(render_chat(tokenizer, _messages(cfg, start + i, ids[i], conv), template, where))
        except Exception as e:  # jinja errors (raise_exception in templates) become row errors
            if isinstance(e, ValueError) and str(e).startswith(where):
                raise
            raise ValueError(f"{where}chat template failed: {type(e).__name__}: {e}") from e
    return out


def tokenize_part(ds, tokenizer, cfg: DatasetConfig, start: int = 0,
                  fingerprint: str | None = None) -> tuple[list[Sample], int]:
    """Tokenize the rows ``start, start+1, ...`` of a dataset held in ``ds`` (the whole dataset
    or a contiguous slice of it) into :class:`Sample` records, applying ``max_length`` /
    ``overflow``; no check across rows (see :func:`tokenize_rows`).

    Sample IDs come from ``cfg.id_field`` or are ``{fingerprint[:16]}-{row index}`` (``fingerprint``
    = the whole dataset's ``_fingerprint``, default ``ds._fingerprint``); with ``overflow: window``
    every sample's ID is ``{id}#{n}`` (window n = 0, 1, ...). Samples with no valid position (fewer
    than 2 tokens, or no target token: an empty text, a chat without assistant content) are
    skipped and counted.

    Returns:
        (samples in row order, n_skipped_empty)
    Raises:
        KeyError: a configured column missing from the dataset's columns.
        ValueError: a bad row (its file, global row index and sample ID are named), or a null ID.
    """
    fmt, chat_col = resolve_format(cfg, ds.column_names)
    if cfg.id_field is not None:
        ids = [None if x is None else str(x) for x in ds[cfg.id_field][:]]
        if None in ids:
            raise ValueError(f"dataset {cfg.path} row {start + ids.index(None)}: id_field {cfg.id_field!r} is null")
    else:
        fp = (fingerprint or ds._fingerprint)[:16]
        ids = [f"{fp}-{start + i}" for i in range(len(ds))]
    rows = _encode_rows(ds, tokenizer, cfg, fmt, chat_col, ids, start)
    samples, skipped = [], 0
    for sid, (toks, mask) in zip(ids, rows):
        for n, (arr, m) in enumerate(fit_length(toks, mask, cfg, tokenizer.bos_token_id)):
            if len(arr) < 2 or not m[1:].any():
                skipped += 1
                continue
            samples.append(Sample(f"{sid}#{n}" if cfg.overflow == "window" else sid, arr, m))
    return samples, skipped


def check_unique(cfg: DatasetConfig, samples: list[Sample], seen: set[str]) -> None:
    """Add the samples' IDs to ``seen``.

    Raises:
        ValueError: an ID already in ``seen`` or twice in ``samples`` (the ID is named).
    """
    for s in samples:
        if s.sample_id in seen:
            raise ValueError(f"dataset {cfg.path}: duplicate sample_id {s.sample_id!r}")
        seen.add(s.sample_id)


def tokenize_rows(ds, tokenizer, cfg: DatasetConfig) -> tuple[list[Sample], int]:
    """Tokenize every row of ``ds`` (plain text, chat or prompt/response, see
    :func:`resolve_format`): :func:`tokenize_part` over the whole dataset, then the checks
    across rows.

    Returns:
        (samples, n_skipped_empty)
    Raises:
        KeyError: a configured column missing from the dataset's columns.
        ValueError: a bad row (its file, row index and sample ID are named), duplicate sample
            IDs (the ID is named) or no usable sample at all.
    """
    samples, skipped = tokenize_part(ds, tokenizer, cfg)
    check_unique(cfg, samples, set())
    if not samples:
        raise _no_samples(cfg, ds)
    return samples, skipped


def _no_samples(cfg: DatasetConfig, ds) -> ValueError:
    return ValueError(f"dataset {cfg.path} (split {cfg.split}): no sample with a target token ({len(ds)} rows, "
                      f"format {resolve_format(cfg, ds.column_names)[0]})")


def _tokenization_fingerprint(ds, tokenizer, cfg: DatasetConfig) -> str:
    """The rows' fingerprint, mixed with every tokenization option that differs from its
    default (and the chat template in use), so a cache is not resumed with other samples."""
    keys = ("format", "text_field", "text_join", "messages_field", "chat_template", "prompt_field", "response_field",
            "overflow", "stride")
    opts = {k: getattr(cfg, k) for k in keys if getattr(cfg, k) != DatasetConfig.model_fields[k].default}
    if resolve_format(cfg, ds.column_names)[0] == "chat":
        opts["chat_template_sha256"] = hashlib.sha256(_chat_template(cfg, tokenizer).encode()).hexdigest()
    if not opts:
        return ds._fingerprint
    return hashlib.sha256((ds._fingerprint + json.dumps(opts, sort_keys=True)).encode()).hexdigest()[:16]


def load_samples(cfg: DatasetConfig, tokenizer) -> tuple[list[Sample], str, int]:
    """:func:`load_rows` then :func:`tokenize_rows`.

    Returns:
        (samples, dataset fingerprint (rows + non-default tokenization options), number of
        skipped empty samples)
    """
    ds = load_rows(cfg)
    if len(ds) == 0:
        raise ValueError(f"dataset {cfg.path} (split {cfg.split}) is empty")
    samples, skipped = tokenize_rows(ds, tokenizer, cfg)
    return samples, _tokenization_fingerprint(ds, tokenizer, cfg), skipped


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Strided share of ``range(n)`` for ``rank``: every rank gets ``n // world_size`` or one more."""
    return list(range(rank, n, world_size))


TOKENIZE_ROWS = 256
"""Rows per tokenizer call in :class:`SampleWindows` (the tokenizer returns Python lists, about
36 bytes per token; samples keep numpy arrays, 5 bytes per token)."""


class SampleWindows:
    """The samples of a dataset, read and tokenized window by window, each rank tokenizing only
    its part of every window (stage 1's streaming input; DESIGN.md, Samples).

    The rows (a memory-mapped ``datasets.Dataset``, :func:`load_rows`) are cut into windows of
    ``window_rows`` consecutive rows; rank ``r`` of ``W`` tokenizes the contiguous part
    ``[a + n·r // W, a + n·(r+1) // W)`` of window ``[a, a + n)``, and one ``all_gather`` per
    window gives every rank the whole window's samples in row order. So a window's samples,
    and anything derived from them (stage 1's length-sorted batches), are the same at every
    world size, while host memory holds one window, not the dataset: peak RSS does not grow
    with the number of rows.

    Iterating is collective: every rank must iterate in step (one gather per window).

    Attributes:
        num_rows: rows of the split (after ``num_samples``).
        fingerprint: the dataset fingerprint recorded in the cache manifest (rows + non-default
            tokenization options, :func:`load_samples`).
        skipped: empty samples skipped so far (all ranks' parts).
        num_samples: samples yielded so far.
    Raises (while iterating, on every rank alike):
        KeyError, ValueError: as :func:`tokenize_part` (the rank that read the bad row names it;
            the others raise the same error), a duplicate sample ID (named), no usable sample in
            the whole dataset.
    """

    def __init__(self, cfg: DatasetConfig, tokenizer, window_rows: int, rank: int = 0, world_size: int = 1,
                 gather=None):
        self.cfg, self.tokenizer, self.window_rows = cfg, tokenizer, window_rows
        self.rank, self.world_size, self.gather = rank, world_size, gather
        self.ds = load_rows(cfg)
        if len(self.ds) == 0:
            raise ValueError(f"dataset {cfg.path} (split {cfg.split}) is empty")
        self.num_rows = len(self.ds)
        self.fingerprint = _tokenization_fingerprint(self.ds, tokenizer, cfg)
        resolve_format(cfg, self.ds.column_names)  # a missing column fails before any teacher forward
        self.skipped = self.num_samples = 0
        self._seen: set[str] = set()

    def _part(self, a: int, n: int):
        lo, hi = a + n * self.rank // self.world_size, a + n * (self.rank + 1) // self.world_size
        samples, skipped = [], 0
        try:  # TOKENIZE_ROWS at a time: the tokenizer's Python lists exist for those rows only
            for a in range(lo, hi, TOKENIZE_ROWS):
                got, n = tokenize_part(self.ds.select(range(a, min(a + TOKENIZE_ROWS, hi))), self.tokenizer, self.cfg,
                                       a, self.ds._fingerprint)
                samples += got
                skipped += n
        except (KeyError, ValueError) as e:
            return e
        return samples, skipped

    def __iter__(self) -> Iterator[tuple[int, list[Sample]]]:
        """Yields ``(rows in the window, the window's samples in row order)``, window by window."""
        for a in range(0, self.num_rows, self.window_rows):
            n = min(self.window_rows, self.num_rows - a)
            part = self._part(a, n)
            parts = self.gather(part) if self.world_size > 1 else [part]
            for p in parts:
                if isinstance(p, BaseException):
                    raise p
            samples = [s for p in parts for s in p[0]]
            self.skipped += sum(p[1] for p in parts)
            check_unique(self.cfg, samples, self._seen)
            self.num_samples += len(samples)
            yield n, samples
        if not self.num_samples:
            raise _no_samples(self.cfg, self.ds)
