"""The dataset section, shared by both stages (stage 1 tokenizes it for the teacher; stage 2
reads it directly when it trains CE-only from ``data.train_dataset``)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.loading import _Section, _file_url_to_path

class DatasetConfig(_Section):
    """Where the raw rows come from and how they become token sequences."""

    path: str
    """A directory written by ``datasets.save_to_disk``, a json/jsonl/parquet/txt/csv file (or
    a directory of them), local or on a store (``s3://bucket/data/``), or a hub name (only when
    online)."""
    split: str = "train"
    """Split to read (a saved ``DatasetDict`` or a hub dataset)."""
    _file_path = field_validator("path")(_file_url_to_path)
    format: Literal["auto", "text", "chat", "prompt_response", "generated"] = "auto"
    """How a row becomes tokens. ``text``: the ``text_field`` column(s), every token a target.
    ``chat``: a list of messages (``{role, content}``, or ShareGPT ``{from, value}``) rendered
    with the tokenizer's chat template; only assistant tokens are targets. ``prompt_response``:
    ``prompt_field`` then ``response_field`` (+ EOS); only response tokens (and EOS) are targets.
    ``generated``: a directory written by ``generate-completions`` (``generation.json`` and
    parquet shards): the stored ``prompt_ids + completion_ids`` are used as they are (no
    tokenization), only completion tokens are targets, the sample IDs are the rows' ``id``
    (``{prompt id}/{j}``), and the tokenizer must be the one that generated them (fingerprint).
    ``auto``: generated when ``path`` holds a ``generation.json``, chat when a ``messages`` or
    ``conversations`` column exists, prompt_response when both prompt and response columns
    exist, text otherwise."""
    text_field: str | list[str] = "text"
    """Column holding the plain text of a sample, or a list of columns joined with ``text_join``."""
    text_join: str = "\n\n"
    """Separator between the ``text_field`` columns when several are given."""
    messages_field: str | None = None
    """Chat column; default ``messages``, else ``conversations``."""
    chat_template: str | None = None
    """Jinja chat template (a string, or a path to a file) replacing the tokenizer's own."""
    prompt_field: str = "prompt"
    response_field: str = "response"
    id_field: str | None = None
    """Column holding a unique sample ID; when unset the ID is ``{fingerprint[:16]}-{row}``."""
    num_samples: int | None = Field(default=None, ge=1)
    """Use only the first N rows (after the split is loaded)."""
    sample_by: Literal["line", "paragraph", "document"] = "line"
    """For .txt files: one row per line, per blank-line-separated paragraph, or per file."""
    max_length: int = Field(default=256, ge=2)
    """Longest sample in tokens (BOS included); longer rows are handled by ``overflow``."""
    overflow: Literal["truncate", "window"] = "truncate"
    """``truncate``: keep the first ``max_length`` tokens. ``window``: split the row into windows
    of at most ``max_length`` tokens (each starting with BOS when the tokenizer adds one) with
    sample IDs ``{id}#{n}``, n = 0, 1, ...; every target token is a target in exactly one window."""
    stride: int | None = Field(default=None, ge=1)
    """``window`` only: tokens between the starts of consecutive windows (default: the window
    length, no overlap). A smaller stride repeats the previous window's last tokens as
    context only (they are not targets again)."""

    @model_validator(mode="after")
    def _check_fields(self) -> "DatasetConfig":
        if isinstance(self.text_field, list) and not self.text_field:
            raise ValueError("text_field: give a column name or a non-empty list of column names")
        if self.stride is not None and (self.overflow != "window" or self.stride >= self.max_length):
            raise ValueError(f"stride {self.stride} needs overflow: window and stride < max_length ({self.max_length})")
        return self


