"""Cross-tokenizer distillation, the data side: a teacher cache written with another tokenizer
(``cache.text_offsets``: each sample's text and the character span of every teacher token)
turned into student-token records in the loader thread.

For each cached sample the student tokenizes the same text with its own (fast) tokenizer,
with character offsets; then

* **alignment** (:func:`align_positions`): a *boundary* of a tokenization is a character offset
  at which one token ends and the next starts. Teacher position ``u`` (which predicts teacher
  token ``u+1``) and student position ``t`` are aligned when the text before both is the same,
  i.e. token ``u`` and token ``t`` end at the same boundary. This is the span alignment of
  TRL's GOLD trainer (``ULDLoss._align_by_byte_offsets``: walk both offset lists, a group closes
  where both reach the same end), which groups the tokens between two common boundaries; each
  group is scored once, at its first predicting position — the distribution over the group's
  first token given the shared text before it (GOLD's ``observed`` merge strategy, without its
  scalar factor, see :mod:`pipeline.student.cross_tokenizer_loss`). Positions inside a group are
  trained with CE only.
* **vocabulary mapping** (:func:`vocab_map`): teacher id ``i`` maps to student id ``j`` when
  their token strings are identical after normalising the tokenizers' markers into the bytes
  they stand for (:func:`token_bytes`: byte-level BPE's ``Ġ``-style byte alphabet, SentencePiece's
  ``▁`` for a space and ``<0xNN>`` byte fallback), as GOLD's ``_initialize_vocabulary_mapping``
  does with the raw strings. The map is injective; special tokens map only to an identical
  special token.

Character offsets (Python string indices, Unicode code points) rather than bytes: every fast
tokenizer reports them, byte-level ones included, and the student's come from the same string.
A byte-level token holding part of a multi-byte character shares its character span with the
next token: no boundary is placed inside a character.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pipeline.cache.records import CacheRecord


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: the printable character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _marker_kind(tokenizer) -> str:
    """``byte_level``, ``metaspace`` or ``plain``: how the tokenizer's token strings encode text,
    read from its decoder (``tokenizer.json``)."""
    dec = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    parts = dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return "byte_level"
    if "Metaspace" in types or any(p.get("type") == "Replace" and "▁" in json.dumps(p.get("pattern", ""), ensure_ascii=False) for p in parts):
        return "metaspace"
    return "plain"


def token_bytes(tokenizer) -> list[bytes | None]:
    """The normalised byte string of every token id ``0 .. len(tokenizer) - 1``.

    byte-level BPE: each character of the token string is one byte (GPT-2's byte alphabet);
    SentencePiece-style (Metaspace): ``▁`` is a space and ``<0xNN>`` the byte ``NN``; other
    tokenizers: the token string in UTF-8. Special tokens become ``b"\\0special:" + name`` so
    they match only the same special token. None for an id without a token.

    Raises:
        ValueError: not a fast tokenizer (no ``backend_tokenizer``).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')}: cross-tokenizer distillation needs a "
                         "fast tokenizer (character offsets and tokenizer.json)")
    kind, dec = _marker_kind(tokenizer), _byte_decoder()
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    out: list[bytes | None] = []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if tok is None:
            out.append(None)
        elif kind == "metaspace" and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            out.append(bytes([int(tok[3:5], 16)]))  # byte fallback (added as special tokens by some)
        elif i in special:
            out.append(b"\0special:" + tok.encode())
        elif kind == "byte_level" and all(c in dec for c in tok):
            out.append(bytes(dec[c] for c in tok))
        else:
            out.append(tok.replace("▁", " ").encode() if kind == "metaspace" else tok.encode())
    return out


def vocab_map(teacher_tokenizer, student_tokenizer) -> np.ndarray:
    """(V_teacher,) int32: the student id of each teacher id whose normalised bytes
    (:func:`token_bytes`) a student token has, else -1. Injective: where several ids of one
    tokenizer normalise to the same bytes (a SentencePiece byte-fallback token ``<0x65>`` and
    ``e``), the ordinary token comes first, then the lowest id.

    Raises:
        ValueError: either tokenizer is not a fast tokenizer.
    """
    student: dict[bytes, int] = {}
    s_bytes = token_bytes(student_tokenizer)
    for j in _preferred_order(student_tokenizer):
        b = s_bytes[j]
        if b is not None and b not in student:
            student[b] = j
    out = np.full(len(teacher_tokenizer), -1, dtype=np.int32)
    taken: set[int] = set()
    t_bytes = token_bytes(teacher_tokenizer)
    for i in _preferred_order(teacher_tokenizer):
        b = t_bytes[i]
        j = student.get(b) if b is not None else None
        if j is not None and j not in taken:
            out[i] = j
            taken.add(j)
    return out


def _preferred_order(tokenizer) -> list[int]:
    """Token ids with ``<0xNN>`` byte-fallback tokens last (stable by id otherwise)."""
    toks = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    fallback = [t is not None and len(t) == 6 and t.startswith("<0x") and t.endswith(">") for t in toks]
    return sorted(range(len(toks)), key=lambda i: (fallback[i], i))


def boundaries(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The boundary after each predicting position of one tokenization.

    Args:
        offsets: (T, 2) int character spans of the T tokens (zero-width for added tokens).
    Returns:
        ``(end, ok)``: (T-1,) int64 character offset of the text before token ``t+1`` (the
        running maximum of the ends, so a zero-width token keeps the boundary before it) and
        (T-1,) bool, True where that offset is a real boundary (the next token starts there
        or later, or is zero-width: not inside a character split over two byte-level tokens).
    """
    o = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    end = np.maximum.accumulate(o[:, 1]) if len(o) else np.zeros(0, np.int64)
    nxt = o[1:]
    ok = (nxt[:, 0] >= end[:-1]) | (nxt[:, 1] <= nxt[:, 0])
    return end[:-1], ok


def align_positions(t_offsets: np.ndarray, s_offsets: np.ndarray, t_valid: np.ndarray,
                    s_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aligned predicting positions of a teacher and a student tokenization of one text.

    Pairs ``(t, u)`` where student token ``t`` and teacher token ``u`` end at the same boundary
    (:func:`boundaries`); where several positions share a boundary (zero-width tokens), the
    last, which has seen every token before the next text, is used. Only positions valid on
    both sides are kept.

    Args:
        t_offsets: (T_t, 2), s_offsets: (T_s, 2) character spans.
        t_valid: (T_t - 1,) bool teacher valid positions (``loss_mask[1:]``); s_valid: (T_s - 1,).
    Returns:
        ``(student_positions, teacher_positions)``: two (M,) int64 arrays, ascending.
    """
    def last_at(end: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.flatnonzero(ok)
        rev = pos[::-1]
        vals, first = np.unique(end[rev], return_index=True)  # first in reverse = last position
        return vals, rev[first]

    sv, sp = last_at(*boundaries(s_offsets))
    tv, tp = last_at(*boundaries(t_offsets))
    _, i, j = np.intersect1d(sv, tv, assume_unique=True, return_indices=True)
    s_pos, t_pos = sp[i], tp[j]
    keep = np.asarray(s_valid, bool)[s_pos] & np.asarray(t_valid, bool)[t_pos]
    return s_pos[keep].astype(np.int64), t_pos[keep].astype(np.int64)


@dataclass
class CrossTokenizerRecord(CacheRecord):
    """A cached sample in the student's tokens, with the teacher targets at aligned positions
    (a :class:`~pipeline.cache.CacheRecord` whose arrays are the student's, plus two masks).

    Attributes:
        input_ids: (T,) int32 student tokens of the sample's text. loss_mask: (T,) bool.
        topk_ids: (T-1, k) int32 student ids of the teacher's top-k (0 where unmapped or not aligned).
        topk_logprobs: (T-1, k) float32 teacher log-probabilities (cache temperature) at aligned
            positions, ``-inf`` elsewhere and in padding slots.
        tail_logprob: (T-1,) float32 teacher tail log-mass at aligned positions; 0 elsewhere
            (all mass in the tail: finite statistics, no target).
        teacher_nll_sum: the cache's (teacher tokens). text / offsets: None.
        mapped: (T-1, k) bool: the slot's teacher id has a student id.
        aligned: (T-1,) bool: the position is aligned with a valid teacher position.
    """

    mapped: np.ndarray | None = None
    aligned: np.ndarray | None = None


def student_mask(text: str, t_offsets: np.ndarray, t_mask: np.ndarray, s_offsets: np.ndarray) -> np.ndarray:
    """(T_s,) bool student loss mask carried over from the teacher's by characters: a student
    token is a target iff it covers a character of a teacher target token; a zero-width
    student token (BOS, EOS) iff it is the last token and the teacher's last token is a target.
    The first token (never a target) takes the teacher's first flag.

    Args:
        text: the sample's text. t_offsets: (T_t, 2) teacher spans; t_mask: (T_t,) bool
            teacher loss mask. s_offsets: (T_s, 2) student spans.
    Returns:
        (T_s,) bool.
    """
    chars = np.zeros(len(text) + 1, dtype=np.int64)
    for (a, b), m in zip(np.asarray(t_offsets), np.asarray(t_mask, bool)):
        if m and b > a:
            chars[a] += 1
            chars[b] -= 1
    covered = np.concatenate([[0], np.cumsum(np.cumsum(chars)[:-1] > 0)])  # covered[c]: target chars before c
    s = np.asarray(s_offsets, dtype=np.int64)
    wide = s[:, 1] > s[:, 0]
    mask = wide & (covered[s[:, 1]] - covered[s[:, 0]] > 0)
    if len(mask) and not wide[-1]:
        mask[-1] = bool(np.asarray(t_mask)[-1])
    if len(mask):  # the first token is never a target: it keeps the teacher's flag (text format: True)
        mask[0] = bool(np.asarray(t_mask)[0])
    return mask


class CrossTokenizerConverter:
    """Turns cache records with text offsets into :class:`CrossTokenizerRecord` for one student
    tokenizer (thread-safe: the fast tokenizer and the numpy work hold no shared state).

    Args:
        teacher_tokenizer, student_tokenizer: fast tokenizers (the cache's and the student's).
        cache: the cache directory (named in errors).
    Raises:
        ValueError: a tokenizer is not fast.
    """

    def __init__(self, teacher_tokenizer, student_tokenizer, cache: str = ""):
        self.student, self.cache = student_tokenizer, cache
        self.map = vocab_map(teacher_tokenizer, student_tokenizer)

    def __call__(self, rec: CacheRecord) -> CrossTokenizerRecord:
        """Convert one record.

        Raises:
            ValueError: the record has no text offsets (cache and sample ID named).
        """
        if rec.offsets is None:
            raise ValueError(f"cache {self.cache} sample_id {rec.sample_id!r}: no text offsets stored")
        enc = self.student(rec.text, add_special_tokens=True, return_offsets_mapping=True, return_attention_mask=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int32)
        s_off = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        mask = student_mask(rec.text, rec.offsets, rec.loss_mask, s_off)
        P, k = max(len(ids) - 1, 0), rec.topk_ids.shape[1]
        s_pos, t_pos = align_positions(rec.offsets, s_off, rec.loss_mask[1:], mask[1:])
        t_ids, lp = rec.topk_ids[t_pos], rec.topk_logprobs[t_pos]
        sid = self.map[t_ids]
        mapped = (sid >= 0) & ~np.isneginf(lp)
        out_ids, out_lp = np.zeros((P, k), np.int32), np.full((P, k), -np.inf, np.float32)
        out_tail, out_mapped, aligned = np.zeros(P, np.float32), np.zeros((P, k), bool), np.zeros(P, bool)
        out_ids[s_pos], out_lp[s_pos] = np.where(mapped, sid, 0), lp
        out_tail[s_pos], out_mapped[s_pos], aligned[s_pos] = rec.tail_logprob[t_pos], mapped, True
        return CrossTokenizerRecord(rec.sample_id, ids, mask, out_ids, out_lp, out_tail, rec.teacher_nll_sum,
                                    mapped=out_mapped, aligned=aligned)


class CrossTokenizerSource:
    """A cache reader seen through a :class:`CrossTokenizerConverter`: indexing returns
    student-token records (converted where indexed: in the loader threads). Everything else
    (``len``, ``index_of``, ``block_ids``, ``manifest``, ...) is the reader's.

    Args:
        reader: a :class:`~pipeline.cache.CacheReader` of a cache with text offsets.
        converter: the student's converter.
    """

    def __init__(self, reader, converter: CrossTokenizerConverter):
        self.reader, self.converter = reader, converter

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> CrossTokenizerRecord:
        return self.converter(self.reader[i])

    def __getattr__(self, name):
        return getattr(self.reader, name)


def wrap_sources(cfg, train, ev, cache_tokenizer_dir: str, student=None):
    """Stage 2's sources for ``cfg``: the cache readers unchanged when the student has no
    tokenizer of its own or the cache's (same fingerprint); else both seen through one
    :class:`CrossTokenizerConverter`.

    Args:
        cfg: the :class:`~pipeline.config.TrainStudentConfig`. train, ev: cache readers (ev may
            be None). cache_tokenizer_dir: the cache's ``tokenizer/`` (local). student: the
            student's own tokenizer (:class:`~pipeline.student.cache_checks.StudentTokenizer`,
            checked by :func:`~pipeline.student.cache_checks.check_student_tokenizer`: another
            one comes with ``loss.cross_tokenizer``), or None.
    Returns:
        ``(train source, eval source or None, student vocabulary size or None)``: None when
        the tokenizers are the same (the cache's vocabulary applies).
    Raises:
        ConfigError: a ``loss.divergence`` other than the default with another tokenizer (the
            cross-tokenizer loss has its own distance); more than one ``data.train_caches``
            with another tokenizer. (``loss.cross_tokenizer`` with the cache's own tokenizer is
            announced in one line and not used.)
        ValueError: a cache without text offsets (written without ``cache.text_offsets``),
            or a tokenizer that is not fast.
    """
    from pipeline.config import ConfigError
    from pipeline.distributed import print0
    from pipeline.models import load_tokenizer

    d, m = cfg.data, train.manifest
    if student is None or student.fingerprint == m.tokenizer_fingerprint:
        if cfg.loss.cross_tokenizer is not None:  # nothing to align: say so rather than ignore it
            print0(f"[train] loss.cross_tokenizer={cfg.loss.cross_tokenizer} ignored: the student tokenizer is the "
                   f"cache's (fingerprint {m.tokenizer_fingerprint}), so the ordinary loss trains (loss.divergence="
                   f"{cfg.loss.divergence}, loss.tail={cfg.loss.tail})")
        return train, ev, None
    teacher_name = m.tokenizer_name or cache_tokenizer_dir
    if cfg.loss.divergence != "forward_kl":
        raise ConfigError(f"loss.divergence={cfg.loss.divergence}: does not apply to a cross-tokenizer run (the "
                          f"student tokenizer {student.path} differs from the cache's {teacher_name}), whose loss is "
                          f"loss.cross_tokenizer={cfg.loss.cross_tokenizer}; remove loss.divergence")
    paths = d.cache_paths()
    if len(paths) > 1:
        raise ConfigError(f"data.train_caches: {len(paths)} caches with another tokenizer than the student's "
                          f"{student.path}; a cross-tokenizer run reads one train cache")
    for c, name in ((train, paths[0]), (ev, d.eval_cache)):
        if c is not None and c.manifest.text_offsets == "none":
            raise ValueError(f"cache {name} has no text offsets (written without cache.text_offsets), so the student "
                             f"tokenizer {student.path} (fingerprint {student.fingerprint}) cannot be aligned to the "
                             f"teacher's {teacher_name} (fingerprint {m.tokenizer_fingerprint})")
    conv = CrossTokenizerConverter(load_tokenizer(cache_tokenizer_dir), student.tokenizer, paths[0])
    wrap = (lambda c: None if c is None else CrossTokenizerSource(c, conv))
    return wrap(train), wrap(ev), len(student.tokenizer)
