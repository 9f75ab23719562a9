"""Row formats: how one dataset row (plain text, chat, prompt/response) becomes token IDs and a
loss mask. :func:`resolve_format` picks the format from the config and the columns,
:func:`render_chat` locates the assistant tokens of a conversation, :func:`fit_length` applies
``max_length`` / ``overflow`` / ``stride``; a bad cell is an error naming the row and sample ID.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import DatasetConfig


ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
                "chatgpt": "assistant", "bot": "assistant", "system": "system", "tool": "tool", "function": "tool",
                "observation": "tool", "ipython": "tool"}
"""Chat roles as the chat template sees them, from OpenAI-style ``role`` or ShareGPT ``from`` values."""


def resolve_format(cfg: DatasetConfig, columns: list[str]) -> tuple[str, str | None]:
    """``(format, chat column)`` for ``cfg.format`` on a dataset with these columns.

    ``auto``: ``generated`` when ``prompt_ids`` and ``completion_ids`` columns exist (a
    generated dataset, :mod:`pipeline.data.generated`), ``chat`` when a ``messages`` (else
    ``conversations``) column exists (or ``messages_field`` is set), ``prompt_response`` when
    ``prompt_field`` and ``response_field`` both exist, ``text`` otherwise.

    Raises:
        KeyError: a configured column is missing (the columns are listed).
    """
    fmt = cfg.format
    chat_col = cfg.messages_field or next((c for c in ("messages", "conversations") if c in columns), None)
    if fmt == "auto":
        if "prompt_ids" in columns and "completion_ids" in columns:  # a generated dataset
            fmt = "generated"
        elif cfg.messages_field or chat_col is not None:
            fmt = "chat"
        elif cfg.prompt_field in columns and cfg.response_field in columns:
            fmt = "prompt_response"
        else:
            fmt = "text"
    needed = {"text": list(_text_fields(cfg)), "chat": [chat_col or "messages"],
              "prompt_response": [cfg.prompt_field, cfg.response_field],
              "generated": ["id", "prompt_ids", "completion_ids"]}[fmt] + ([cfg.id_field] if cfg.id_field else [])
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


def text_offsets(ds, tokenizer, cfg: DatasetConfig, fmt: str, ids: list[str],
                 start: int = 0) -> list[tuple[list[int], np.ndarray, str, np.ndarray]]:
    """Per row ``(input_ids, loss_mask, text, offsets)`` of a ``text``-format dataset, with the
    character span of every token from the fast tokenizer's offset mapping (the tokens are
    those of :func:`_encode_rows`, the same call with ``return_offsets_mapping``).

    Offsets are Python string indices (Unicode code points) into ``text``, (T, 2) int32;
    tokens the tokenizer adds (BOS, EOS) are zero-width. Character offsets rather than byte
    offsets: every fast tokenizer reports them, whatever its model (byte-level BPE included),
    and a student tokenizer run on the same string reports the same kind.

    Raises:
        ValueError: a format other than ``text``, or a tokenizer without offsets (a slow
            tokenizer); the dataset is named.
    """
    if fmt != "text":
        raise ValueError(f"dataset {cfg.path}: character offsets (cache.text_offsets) need format text, "
                         f"this dataset is {fmt}")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"dataset {cfg.path}: character offsets (cache.text_offsets) need a fast tokenizer")
    fields = _text_fields(cfg)
    cols = [ds[f][:] for f in fields]
    texts = [cfg.text_join.join(v for v in (_str_value(cfg, start + i, ids[i], f, x) for f, x in zip(fields, vals)) if v)
             for i, vals in enumerate(zip(*cols))]
    trunc = cfg.overflow == "truncate"
    enc = tokenizer(texts, truncation=trunc, max_length=cfg.max_length if trunc else None, add_special_tokens=True,
                    return_attention_mask=False, return_offsets_mapping=True)
    return [(toks, np.ones(len(toks), dtype=bool), text, np.asarray(offs, dtype=np.int32).reshape(-1, 2))
            for toks, text, offs in zip(enc["input_ids"], texts, enc["offset_mapping"])]


def window_text(text: str, offsets: np.ndarray) -> tuple[str, np.ndarray]:
    """The part of ``text`` a sample's tokens cover, and their offsets shifted into it.

    Args:
        text: the row's whole text. offsets: (T, 2) int32 spans of the sample's tokens in it.
    Returns:
        ``(text[a:b], offsets - a)`` with ``a`` / ``b`` the first start / last end of the
        tokens that cover characters; zero-width tokens are clipped into ``[0, b - a]``.
    """
    wide = offsets[:, 1] > offsets[:, 0]
    if not wide.any():
        return "", np.zeros_like(offsets)
    a, b = int(offsets[wide, 0].min()), int(offsets[wide, 1].max())
    return text[a:b], np.clip(offsets - a, 0, b - a).astype(np.int32)


def _encode_rows(ds, tokenizer, cfg: DatasetConfig, fmt: str, chat_col: str | None, ids: list[str],
                 start: int = 0) -> list:
    """Per row ``(input_ids, loss_mask)`` before the length limit (text rows are truncated here
    by the tokenizer itself when ``overflow: truncate``, which keeps any EOS it appends).
    ``ds`` holds rows ``start, start+1, ...`` of the dataset (errors name those row numbers).
    Generated rows are their stored ``prompt_ids + completion_ids``, targets on the completion."""
    if fmt == "generated":
        return [(list(p) + list(c), np.concatenate([np.zeros(len(p), bool), np.ones(len(c), bool)]))
                for p, c in zip(ds["prompt_ids"][:], ds["completion_ids"][:])]
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
