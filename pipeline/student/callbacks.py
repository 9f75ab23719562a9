"""Callbacks: the one way to hook into ``train-student``'s loop (metrics logging and early
stopping are callbacks too).

A callback is any object with some of the methods of :class:`Callback` (plain methods with
no-op defaults; subclassing :class:`Callback` is a convenience, not a requirement). Events, per
round of training (a run without ``rounds:`` is one round)::

    on_train_begin(state)                  after the student, data and any resume are ready
    on_step_end(state, metrics)            after every optimizer step (metrics: train/*)
    on_evaluate(state, metrics)            after every evaluation (metrics: eval/*)
    on_save(state, path)                   after a checkpoint is complete (path: its dir or URL)
    on_train_end(state, summary)           after final/ is exported (summary: summary.json's dict)
    on_round_end(state, summary)           after the round ended (multi-round runs: before the next)

**Ranks.** Every callback is called on every rank, at the same points, with the same global
metrics (all-reduced over ranks). Rank-0-only work (writing a file, printing) checks
``state.is_main``. A callback may run collectives only if it does so on every rank.

**Asking to stop or to save.** ``state.request_stop(reason)`` ends the round after the current
step, with a checkpoint of that step (``save=False`` skips it) and the usual ``final/`` export;
``state.request_save()`` writes a checkpoint at the current step boundary. A request made on
some ranks only is agreed over all ranks (one tiny all-reduce per step, made only when a user
callback is configured), so every rank stops or saves after the same step.

**State.** A callback with ``state_dict()`` / ``load_state_dict(d)`` has its state saved in every
checkpoint and restored on resume, so a resumed run calls it as an uninterrupted run would.

Configured by import path (``callbacks: [{target: my_pkg.hooks:DumpSamples, every: 100}]``; the
other keys are the constructor's keyword arguments): :func:`load_callbacks`.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunState:
    """The one state of a training round: what callbacks see, and what checkpoints save
    (:meth:`state_dict`) and a resume restores (:meth:`load_state_dict`). Callbacks read it and
    change it only through the request methods. ``step`` is the optimizer step just finished
    (1-based; 0 before the first)."""

    round: int
    step: int
    max_steps: int
    epoch: int
    """Epochs completed before the current one (0-based index of the current epoch)."""
    epoch_progress: float
    """``epoch`` + the fraction of the current epoch's samples consumed."""
    tokens: int
    """Valid (target) tokens trained on so far, all ranks."""
    best_eval_loss: float
    """Lowest ``eval/loss`` so far (inf before the first evaluation)."""
    evals_without_improvement: int
    rank: int
    world_size: int
    output_dir: str
    """The round's run directory (a local path or a URL)."""
    model: Any = field(default=None, repr=False)
    """The student: FSDP2-wrapped (its forward is collective: call it on every rank), or the
    plain module at one float32 rank (``pipeline.student.loop.uses_fsdp``)."""
    optimizer: Any = field(default=None, repr=False)
    stop_reason: str | None = None
    save_requested: bool = False
    save_on_stop: bool = True
    position: int = 0
    """Samples of the current epoch consumed (the sampler's position; a resume continues there)."""
    skipped_steps: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient norm (``skip_nonfinite``)."""
    extra: dict = field(default_factory=dict, repr=False)
    """Checkpoint entries other owners keep (``samples_consumed``, ``callbacks``: the callbacks'
    states, the Trainer's ``grad_scaler``/``overflow_steps``), and any entry of a resumed
    checkpoint this class does not model: saved back verbatim, so resumes keep every key."""

    @property
    def is_main(self) -> bool:
        """Rank 0: where rank-0-only work (files, printing) belongs."""
        return self.rank == 0

    def request_stop(self, reason: str = "stopped", save: bool = True) -> None:
        """End the round after the current step (``reason`` becomes the run's ``outcome``); with
        ``save`` a checkpoint of that step is written first."""
        if self.stop_reason is None:
            self.stop_reason, self.save_on_stop = reason, save

    def request_save(self) -> None:
        """Write a checkpoint at the current step boundary."""
        self.save_requested = True

    def state_dict(self) -> dict:
        """The trainer state a checkpoint saves (``trainer.pt``'s ``"trainer"``): ``step``,
        ``epoch``, ``position``, ``best``, ``bad_evals``, ``tokens``, ``round``, ``skipped_steps``
        (only once a step was skipped: older checkpoints lack it) and the :attr:`extra` entries."""
        d = {"step": self.step, "epoch": self.epoch, "position": self.position, "best": self.best_eval_loss,
             "bad_evals": self.evals_without_improvement, "tokens": self.tokens, "round": self.round}
        if self.skipped_steps:
            d["skipped_steps"] = self.skipped_steps
        d.update(self.extra)
        return d

    def load_state_dict(self, d: dict) -> None:
        """Restore what :meth:`state_dict` saved (a checkpoint's trainer state); ``epoch_progress``
        is the caller's to recompute (it needs the epoch's sample count).

        Raises:
            KeyError: a core key (``step``, ``epoch``, ``position``, ``best``, ``bad_evals``,
                ``tokens``) is missing: not a trainer state of this pipeline.
        """
        d = dict(d)
        self.step, self.epoch, self.position = d.pop("step"), d.pop("epoch"), d.pop("position")
        self.best_eval_loss, self.evals_without_improvement = d.pop("best"), d.pop("bad_evals")
        self.tokens, self.skipped_steps = d.pop("tokens"), d.pop("skipped_steps", 0)
        # "round" stays in extra: the checkpoint's own value is saved back unchanged (a resume
        # PATH of another round's run keeps it), while callbacks keep seeing this round's number
        self.extra = d


TrainState = RunState
"""The former name (user callbacks import it from here)."""


def early_stopping_update(best: float, bad_evals: int, loss: float, min_delta: float,
                          patience: int | None) -> tuple[float, int, bool, bool]:
    """One evaluation's effect on early stopping (the rule :class:`EarlyStopping` applies).

    An eval improves when ``loss < best - min_delta``; ``patience`` consecutive evals without
    improvement stop training (None: never stop).

    Returns:
        (new best, new count of evals without improvement, improved, stop)
    """
    improved = loss < best - min_delta
    best, bad_evals = (loss, 0) if improved else (best, bad_evals + 1)
    return best, bad_evals, improved, patience is not None and bad_evals >= patience


class Callback:
    """The protocol, with no-op defaults (see the module docstring for when each is called)."""

    def on_train_begin(self, state: RunState) -> None:
        """After the student, data and any resume are ready."""

    def on_step_end(self, state: RunState, metrics: dict[str, float]) -> None:
        """After every optimizer step; ``metrics``: the step's ``train/*`` (global over ranks)."""

    def on_evaluate(self, state: RunState, metrics: dict[str, float]) -> None:
        """After every evaluation; ``metrics``: its ``eval/*``."""

    def on_save(self, state: RunState, path: str) -> None:
        """After a checkpoint is complete; ``path``: its directory or URL."""

    def on_train_end(self, state: RunState, summary: dict | None) -> None:
        """After final/ is exported; ``summary``: summary.json's dict."""

    def on_round_end(self, state: RunState, summary: dict | None) -> None:
        """After the round ended (multi-round runs: before the next round starts)."""


EVENTS = ("on_train_begin", "on_step_end", "on_evaluate", "on_save", "on_train_end", "on_round_end")


class CallbackList:
    """Calls an event on every callback in order (built-ins first, then the configured ones).

    Args:
        callbacks: objects with any subset of :data:`EVENTS` as methods.
        n_builtin: how many of them are built-ins: their requests are the same on every rank by
            construction (they read all-reduced metrics), so only user callbacks cost the
            per-step agreement (:attr:`needs_agreement`).
    """

    def __init__(self, callbacks: list, n_builtin: int = 0):
        self.callbacks = list(callbacks)
        self.needs_agreement = len(self.callbacks) > n_builtin

    def call(self, event: str, *args) -> None:
        """Call ``event`` with ``args`` on every callback that has it, in order (an error propagates)."""
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(*args)

    def state_dict(self) -> dict:
        """``{"<index>:<class>": callback.state_dict()}`` of the callbacks that have state."""
        return {f"{i}:{type(cb).__name__}": cb.state_dict() for i, cb in enumerate(self.callbacks)
                if callable(getattr(cb, "state_dict", None))}

    def load_state_dict(self, d: dict) -> None:
        """Restore what :meth:`state_dict` saved (keys of other callbacks are ignored with a
        warning: the config's callbacks changed since the checkpoint)."""
        for key, value in d.items():
            i, name = key.split(":", 1)
            cb = self.callbacks[int(i)] if int(i) < len(self.callbacks) else None
            if cb is None or type(cb).__name__ != name or not callable(getattr(cb, "load_state_dict", None)):
                print(f"[callbacks] warning: checkpoint holds state of callback {key} that this config does not have; "
                      "ignored", file=sys.stderr, flush=True)
                continue
            cb.load_state_dict(value)


class EarlyStopping(Callback):
    """Built-in: stop the round when ``eval/loss`` has not improved by more than ``min_delta``
    for ``patience`` evaluations (``early_stopping:`` config; no checkpoint is written for
    the stop, outcome ``early_stopped``). It owns both rules: :meth:`update` (improvement, the
    loop calls it with each eval loss: best/ is exported on improvement) and :meth:`on_evaluate`
    (patience). The counters live in :class:`RunState` (saved in every checkpoint)."""

    def __init__(self, patience: int | None, min_delta: float):
        self.patience, self.min_delta = patience, min_delta

    def update(self, state: RunState, loss: float) -> bool:
        """Apply one evaluation's ``loss`` to ``state.best_eval_loss`` and
        ``state.evals_without_improvement``; returns whether it improved."""
        state.best_eval_loss, state.evals_without_improvement, improved, _ = early_stopping_update(
            state.best_eval_loss, state.evals_without_improvement, loss, self.min_delta, None)
        return improved

    def on_evaluate(self, state: RunState, metrics: dict[str, float]) -> None:
        """Request the stop once ``patience`` evaluations in a row did not improve."""
        if self.patience is not None and state.evals_without_improvement >= self.patience:
            state.request_stop("early_stopped", save=False)


class MetricsCallback(Callback):
    """Built-in: ``train/*`` every ``log_steps`` steps (and step 1), every ``eval/*``, to
    :class:`pipeline.student.metrics.MetricsLogger` (metrics.jsonl + wandb, rank 0); flushed at every
    checkpoint (the loop closes the logger at the end of the round, also on an error)."""

    def __init__(self, logger, log_steps: int):
        self.logger, self.log_steps = logger, log_steps

    def on_step_end(self, state: RunState, metrics: dict[str, float]) -> None:
        """Log ``train/*`` at step 1 and every ``log_steps`` steps."""
        if state.step % self.log_steps == 0 or state.step == 1:
            self.logger.log(metrics, state.step)

    def on_evaluate(self, state: RunState, metrics: dict[str, float]) -> None:
        """Log every evaluation's ``eval/*``."""
        self.logger.log(metrics, state.step)

    def on_save(self, state: RunState, path: str) -> None:
        """Flush the log, so metrics.jsonl covers the checkpoint's steps."""
        self.logger.flush()


def load_callbacks(entries: list) -> list:
    """Instantiate the configured callbacks: each entry has ``target`` (``"module.path:Name"``,
    a class or a factory) and keyword arguments (the entry's other keys).

    Raises:
        ValueError: the module cannot be imported, the name is not in it, or the call fails
            (names the entry ``callbacks[i]`` and its target; the cause in one line).
    """
    out = []
    for i, entry in enumerate(entries):
        spec = entry.model_dump() if hasattr(entry, "model_dump") else dict(entry)
        target = spec.pop("target")
        where = f"config key 'callbacks[{i}]' ({target})"
        module, sep, name = target.partition(":")
        if not sep or not module or not name:
            raise ValueError(f"{where}: target must be 'package.module:Name'")
        try:
            obj = importlib.import_module(module)
        except Exception as e:  # ImportError, or an error raised while importing the module
            raise ValueError(f"{where}: cannot import module {module!r}: {type(e).__name__}: {e}") from None
        for part in name.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"{where}: module {module!r} has no {name!r}")
            obj = getattr(obj, part)
        try:
            cb = obj(**spec)
        except Exception as e:  # wrong or missing keyword arguments, or the constructor failed
            args = ", ".join(f"{k}={v!r}" for k, v in spec.items())
            raise ValueError(f"{where}: {name}({args}) failed: {type(e).__name__}: {e}") from None
        if not any(callable(getattr(cb, ev, None)) for ev in EVENTS):
            raise ValueError(f"{where}: {name} has none of the callback methods {', '.join(EVENTS)}")
        out.append(cb)
    return out
