"""What stage 2 checks of its caches before training: the student's own tokenizer against the
train cache's (a student trained on another vocabulary's token ids learns nothing it can use,
and its export would look consistent), and the eval cache against the train cache (the eval
loss picks ``best/`` and stops early, so it must score what training scores).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from pipeline.cache.mixture import MATCHED_FIELDS
from pipeline.config import ConfigError
from pipeline.distributed import print0
from pipeline.storage import Folder

EVAL_MATCHED_FIELDS = MATCHED_FIELDS
"""Manifest fields the eval cache must share with the train cache: tokenizer fingerprint,
vocabulary size, target type, k and temperature (those a mixture's caches share)."""


@dataclass
class StudentTokenizer:
    """The student's own tokenizer.

    Attributes:
        path: its local directory.
        key: where it came from: ``data.tokenizer`` or ``student.path`` (the tokenizer files of
            the student's directory).
        tokenizer: the loaded Hugging Face tokenizer.
        fingerprint: :func:`~pipeline.models.tokenizer_fingerprint` of it.
    """

    path: str
    key: str
    tokenizer: object
    fingerprint: str


def find_student_tokenizer(cfg) -> StudentTokenizer | None:
    """The student's own tokenizer: ``data.tokenizer`` when set, else the tokenizer files of the
    student's directory (``student.path``, or the directory of its ``config.json``; a store's
    copy downloaded once per process); None when neither has one.

    Raises:
        FileNotFoundError: ``data.tokenizer`` or the student's tokenizer files do not load (named).
    """
    from pipeline.models import has_tokenizer, load_tokenizer, tokenizer_fingerprint

    if cfg.data.tokenizer is not None:
        path, key = cfg.data.tokenizer, "data.tokenizer"
    else:
        p = Path(Folder(cfg.student.path).local())
        path, key = str(p.parent if p.is_file() else p), "student.path"
        if not has_tokenizer(path):
            return None
    tok = load_tokenizer(path)
    return StudentTokenizer(path, key, tok, tokenizer_fingerprint(tok))


def check_student_tokenizer(cfg, manifest, cache_tokenizer_dir: str) -> StudentTokenizer | None:
    """Compare the student's own tokenizer (:func:`find_student_tokenizer`) with the train
    cache's ``tokenizer_fingerprint``; a student without one uses the cache's tokenizer, which
    is said once (rank 0).

    Args:
        cfg: the :class:`~pipeline.config.TrainStudentConfig`. manifest: the train cache's
            :class:`~pipeline.cache.manifest.Manifest`. cache_tokenizer_dir: its ``tokenizer/``
            (local).
    Returns:
        The student's tokenizer (what ``best/`` and ``final/`` carry), or None when it has none
        (the cache's is exported).
    Raises:
        ConfigError: the fingerprints differ and ``loss.cross_tokenizer`` is not set (one line
            naming both tokenizers' paths and fingerprints).
        FileNotFoundError: the student's tokenizer does not load (named).
    """
    student = find_student_tokenizer(cfg)
    if student is None:
        print0(f"[train] student {cfg.student.path} has no tokenizer files and data.tokenizer is unset: it uses "
               f"the train cache's tokenizer ({cache_tokenizer_dir}, fingerprint {manifest.tokenizer_fingerprint}), "
               "which best/ and final/ carry")
        return None
    if student.fingerprint != manifest.tokenizer_fingerprint and cfg.loss.cross_tokenizer is None:
        raise ConfigError(
            f"student tokenizer {student.path} ({student.key}, fingerprint {student.fingerprint}) is not the train "
            f"cache's tokenizer {cache_tokenizer_dir} (fingerprint {manifest.tokenizer_fingerprint}): the student "
            "would learn the teacher's token ids as its own; use a student of the cache's tokenizer, or set "
            "loss.cross_tokenizer (gold or uld) to distil across tokenizers from a cache written with "
            "cache.text_offsets")
    return student


def check_eval_cache(cfg, train_manifest, eval_manifest, train_path: str, eval_path: str) -> None:
    """Refuse an eval cache that does not score what the train cache trains: first the train
    cache's resolved ``loss.tail`` (:func:`~pipeline.student.losses.resolve_tail`) must be
    valid for the eval cache, then every field of :data:`EVAL_MATCHED_FIELDS` must be equal.
    Without teacher targets (``loss.alpha`` 1) the tail is not checked.

    Raises:
        ConfigError: a refused tail mode, or a field that differs (one line naming both caches,
            the field and both values).
    """
    from pipeline.student.losses import resolve_tail

    with warnings.catch_warnings():  # the train cache's own warnings are issued where it is resolved
        warnings.simplefilter("ignore")
        resolved = resolve_tail(cfg, train_manifest.target_type, train_manifest.temperature)
        try:
            resolve_tail(resolved, eval_manifest.target_type, eval_manifest.temperature)
        except ConfigError as e:
            raise ConfigError(
                f"data.eval_cache {eval_path} ({eval_manifest.target_type} targets) refuses loss.tail="
                f"{resolved.loss.tail}, resolved for the train cache {train_path} ({train_manifest.target_type} "
                f"targets): {e}") from None
    for name in EVAL_MATCHED_FIELDS:
        a, b = getattr(train_manifest, name), getattr(eval_manifest, name)
        if a != b:
            raise ConfigError(f"data.eval_cache {eval_path} has {name} {b!r}, the train cache {train_path} has {a!r}; "
                              "the eval loss (which picks best/ and early stopping) must score what training "
                              "scores")
