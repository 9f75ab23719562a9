"""Callbacks used by tests/test_callbacks.py, loaded by import path from the config
(``tests.callback_hooks:Recorder``) in-process and under torchrun."""
from __future__ import annotations

import json

from pipeline.student.callbacks import Callback


class Recorder(Callback):
    """Appends one JSON line per event to ``<log>.rank<R>.jsonl``; rank ``stop_rank`` asks to stop
    after step ``stop_at``; every rank asks to save after step ``save_at``. Its state (events
    seen) is saved in checkpoints."""

    def __init__(self, log: str, stop_at: int | None = None, stop_rank: int = 0, save_at: int | None = None):
        self.log, self.stop_at, self.stop_rank, self.save_at = log, stop_at, stop_rank, save_at
        self.seen = 0

    def _write(self, state, event: str, **extra) -> None:
        self.seen += 1
        with open(f"{self.log}.rank{state.rank}.jsonl", "a") as fh:
            fh.write(json.dumps({"event": event, "step": state.step, "round": state.round, "seen": self.seen, **extra}) + "\n")

    def on_train_begin(self, state):
        self._write(state, "on_train_begin")

    def on_step_end(self, state, metrics):
        self._write(state, "on_step_end", loss=metrics["train/loss"], tokens=state.tokens)
        if state.step == self.stop_at and state.rank == self.stop_rank:
            state.request_stop("budget")
        if state.step == self.save_at:
            state.request_save()

    def on_evaluate(self, state, metrics):
        self._write(state, "on_evaluate", loss=metrics["eval/loss"])

    def on_save(self, state, path):
        self._write(state, "on_save", path=path)

    def on_train_end(self, state, summary):
        self._write(state, "on_train_end", outcome=summary["outcome"])

    def on_round_end(self, state, summary):
        self._write(state, "on_round_end")

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, d):
        self.seen = d["seen"]


def needs_two(a, b):
    """A factory with two required arguments (the config error test omits one)."""
    return Recorder(a)
