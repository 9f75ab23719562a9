"""The first-batch check of stage 1: a teacher whose load went wrong (an output layer never
filled gives uniform outputs; garbage weights give a near-uniform distribution) is stopped
before its cache is written, naming the teacher.

A teacher is refused when, on the first batch of every rank together,
- its outputs are **uniform**: every position's log-probabilities equal (``−log V``), or
- its **perplexity** ``exp(Σ −log p(next token) / positions)`` at temperature 1 is ≥ V/2:
  within a factor 2 of guessing uniformly. A trained causal LM on text is far below (the demo
  teacher: 67 at V = 4,096, held out). An untrained (random) teacher is near V:
  ``teacher_check: warn`` lets it through with a warning (tests, smoke runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pipeline.distributed import gather_objects, print0
from pipeline.teacher.topk import position_logprobs

UNIFORM_SPREAD = 1e-5
"""Largest ``max − min`` of one position's float32 log-probabilities (nats) that counts as
uniform (a zero output layer gives exactly 0)."""

MAX_ROWS = 1024
"""Positions of the first batch the check computes full-vocabulary log-probabilities for."""


@dataclass(frozen=True)
class FirstBatch:
    """One teacher's numbers on one rank's first batch.

    Attributes:
        nll_sum: ``Σ −log p(next token)`` over the positions, nats, temperature 1.
        positions: the number of positions summed (0 on a padding call).
        uniform: every position's log-probabilities are equal (within :data:`UNIFORM_SPREAD`).
    """

    nll_sum: float = 0.0
    positions: int = 0
    uniform: bool = False


def first_batch(hidden: torch.Tensor, head: tuple, rows: torch.Tensor, next_ids: torch.Tensor) -> FirstBatch:
    """The :class:`FirstBatch` numbers of one teacher from its final hidden states.

    Args:
        hidden: (B·T, H) the teacher's final hidden states; head: ``(weight (V, H), bias or
            None)`` (:func:`~pipeline.teacher.topk.output_head`); rows: (N,) int64 flat
            positions; next_ids: (N,) int64 the token after each. At most :data:`MAX_ROWS`
            positions are used.
    """
    rows, next_ids = rows[:MAX_ROWS], next_ids[:MAX_ROWS]
    if not len(rows):
        return FirstBatch()
    lp = position_logprobs([hidden], [head], [1.0], rows)  # (N, V) float32, temperature 1
    spread = lp.amax(dim=-1) - lp.amin(dim=-1)
    nll = -lp.gather(-1, next_ids[:, None]).sum()
    return FirstBatch(float(nll), len(rows), bool((spread <= UNIFORM_SPREAD).all()))


def check_first_batch(mine: list[FirstBatch], teachers: list[str], vocab: int, mode: str) -> None:
    """Stop stage 1 when a teacher looks like a broken load (module docstring). Collective:
    every rank calls it with its own numbers (one :class:`FirstBatch` per teacher) and every
    rank raises the same error.

    Args:
        mine: this rank's numbers, one per teacher, in the order of ``teachers`` (paths).
        vocab: V, the cache vocabulary.
        mode: ``stop`` (``teacher_check``: raise) or ``warn`` (print one line on rank 0, go on)
            for the perplexity test; uniform outputs stop in both.
    Raises:
        ValueError: one line naming the teacher: its outputs are uniform, or (``stop``) its
            perplexity is ≥ V/2.
    """
    ranks = gather_objects(mine)
    for i, path in enumerate(teachers):
        n = sum(r[i].positions for r in ranks)
        if n == 0:
            continue
        if any(r[i].uniform for r in ranks):
            raise ValueError(f"teacher {path}: its outputs are uniform on the first batch (every log-probability "
                             f"-log V = {-math.log(vocab):.4f}): a broken load, e.g. an output layer never filled")
        ppl = math.exp(sum(r[i].nll_sum for r in ranks) / n)
        if ppl >= vocab / 2:
            msg = (f"teacher {path}: perplexity {ppl:.1f} on the first batch ({n} positions) is >= V/2 = "
                   f"{vocab / 2:g}: a broken load or an untrained model")
            if mode == "stop":
                raise ValueError(msg + " (teacher_check: warn lets it through)")
            print0(f"[precompute] warning: {msg}")
