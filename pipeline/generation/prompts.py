"""Prompts of a prompt dataset: the same rows and sample IDs as stage 1 (:mod:`pipeline.data`), cut
where the model is to continue.

- chat rows: the messages before the last assistant message (all of them when there is none),
  rendered with the chat template and its generation prompt;
- prompt/response rows: the prompt (``prompt_field``), tokenized with the special tokens;
- text rows: the first ``prompt_tokens`` tokens of the text (a trailing EOS dropped).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import DatasetConfig
from pipeline.data.formats import _chat_template, _messages, _str_value, _text_fields, resolve_format


@dataclass(frozen=True)
class Prompt:
    """One prompt to complete.

    Attributes:
        prompt_id: the row's sample ID (``id_field``, or ``{dataset fingerprint[:16]}-{row}`` as in stage 1).
        ids: (P,) int32 token IDs the model sees (BOS and chat markup included).
        text: the prompt's text (chat: the template's rendering; prompt/response: the prompt
            cell; text: the decoded prompt tokens).
    """

    prompt_id: str
    ids: np.ndarray
    text: str


def prompt_format(cfg: DatasetConfig, columns: list[str]) -> tuple[str, str | None]:
    """``(format, chat column)`` of a prompt dataset (:func:`~pipeline.data.resolve_format`).

    Raises:
        KeyError: a configured column is missing.
        ValueError: the dataset is itself a generated dataset (its rows are completions, not prompts).
    """
    fmt, chat_col = resolve_format(cfg, columns)
    if fmt == "generated":
        raise ValueError(f"dataset {cfg.path}: a generated dataset cannot be the prompt dataset (use the prompt "
                         "dataset it was generated from)")
    return fmt, chat_col


def row_ids(ds, cfg: DatasetConfig, start: int, fingerprint: str) -> list[str]:
    """Prompt IDs of the rows ``start, start+1, ...`` held in ``ds``: ``cfg.id_field`` as a
    string, or ``{fingerprint[:16]}-{row}`` (stage 1's sample IDs).

    Raises:
        ValueError: a null ID (row named).
    """
    if cfg.id_field is None:
        return [f"{fingerprint[:16]}-{start + i}" for i in range(len(ds))]
    ids = [None if x is None else str(x) for x in ds[cfg.id_field][:]]
    if None in ids:
        raise ValueError(f"dataset {cfg.path} row {start + ids.index(None)}: id_field {cfg.id_field!r} is null")
    return ids


def _chat_prompts(ds, tokenizer, cfg: DatasetConfig, chat_col: str, ids: list[str], start: int) -> list:
    """``(token IDs, text)`` or None (nothing before the first assistant message) per chat row."""
    template = _chat_template(cfg, tokenizer)
    bos = tokenizer.bos_token
    out = []
    for i, conv in enumerate(ds[chat_col][:]):
        where = f"dataset {cfg.path} row {start + i} (sample_id {ids[i]!r}): "
        msgs = _messages(cfg, start + i, ids[i], conv)
        last = max((k for k, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        if last == 0:
            out.append(None)
            continue
        try:
            text = tokenizer.apply_chat_template(msgs[:last], chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # jinja errors (raise_exception in templates) become row errors
            raise ValueError(f"{where}chat template failed: {type(e).__name__}: {e}") from e
        toks = tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
        out.append((toks, text))
    return out


def _plain_prompts(ds, tokenizer, cfg: DatasetConfig, fmt: str, prompt_tokens: int, ids: list[str],
                   start: int) -> list:
    """``(token IDs, text)`` or None (an empty cell) per text or prompt/response row."""
    if fmt == "prompt_response":
        texts = [_str_value(cfg, start + i, ids[i], cfg.prompt_field, x) for i, x in enumerate(ds[cfg.prompt_field][:])]
    else:
        fields = _text_fields(cfg)
        cols = [ds[f][:] for f in fields]
        texts = [cfg.text_join.join(v for v in (_str_value(cfg, start + i, ids[i], f, x) for f, x in zip(fields, vals)) if v)
                 for i, vals in enumerate(zip(*cols))]
    enc = tokenizer(texts, add_special_tokens=True, return_attention_mask=False)["input_ids"]
    out = []
    for text, toks in zip(texts, enc):
        if not text:
            out.append(None)
            continue
        if fmt == "text":
            toks = list(toks[:prompt_tokens])
            while toks and tokenizer.eos_token_id is not None and toks[-1] == tokenizer.eos_token_id:
                toks.pop()  # a tokenizer that appends EOS: the prompt must not end the text
            text = tokenizer.decode(toks, skip_special_tokens=True)
        out.append((toks, text))
    return out


def make_prompts(ds, tokenizer, cfg: DatasetConfig, prompt_tokens: int, start: int,
                 fingerprint: str) -> tuple[list[Prompt], int]:
    """The prompts of the rows ``start, start+1, ...`` held in ``ds`` (a slice of the dataset
    whose ``_fingerprint`` is ``fingerprint``), in row order.

    A row with nothing to prompt with (an empty text or prompt cell, a chat starting with the
    assistant) or whose prompt is longer than ``cfg.max_length`` tokens is skipped and counted.

    Returns:
        (prompts, number of skipped rows)
    Raises:
        KeyError: a configured column is missing.
        ValueError: a bad row (file, row and sample ID named), a null ID, a generated dataset.
    """
    fmt, chat_col = prompt_format(cfg, ds.column_names)
    ids = row_ids(ds, cfg, start, fingerprint)
    if fmt == "chat":
        rows = _chat_prompts(ds, tokenizer, cfg, chat_col, ids, start)
    else:
        rows = _plain_prompts(ds, tokenizer, cfg, fmt, prompt_tokens, ids, start)
    prompts = [Prompt(pid, np.asarray(r[0], dtype=np.int32), r[1]) for pid, r in zip(ids, rows)
               if r is not None and 0 < len(r[0]) <= cfg.max_length]
    return prompts, len(ids) - len(prompts)
