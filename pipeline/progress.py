"""Progress reporting that reads well both on a terminal and in a log file.

On a terminal (``sys.stderr.isatty()``) a :class:`Progress` is a tqdm bar redrawn in place. In
a log file (batch jobs, ``2> log``, pipes) it prints one plain line on stderr every N seconds
instead (tqdm would write every redraw to the file, joined by ``\\r``)::

    train: 120/400 step (30%), 4.1 step/s, 29s elapsed, eta 68s, 5.0k tok/s, loss 2.8091

``KD_PROGRESS_EVERY_S`` (seconds, default 30) sets the interval; ``0`` prints every update.
The unit rate (``step/s``) and the eta are averages since the process started; the token rate
(``tok/s``) is an :class:`IntervalRate`: the tokens since the previous plain line divided by the
seconds since it (on a bar, since the previous refresh of the rate, at most once a second), so it
neither jumps with the size of the last step nor hides a slowdown behind the run's average.
Messages meant to sit between bar redraws go through :func:`write`; :func:`close_all` ends any
open bar's line, so an error printed after it starts on a line of its own.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

EVERY_S_DEFAULT = 30.0
"""Seconds between plain progress lines when stderr is not a terminal."""

_OPEN: list["Progress"] = []


def every_s() -> float:
    """The plain-line interval in seconds: ``KD_PROGRESS_EVERY_S`` or 30.

    Raises:
        ValueError: the variable is set to something that is not a non-negative number.
    """
    raw = os.environ.get("KD_PROGRESS_EVERY_S", "")
    if not raw:
        return EVERY_S_DEFAULT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"KD_PROGRESS_EVERY_S={raw!r}: expected a number of seconds >= 0")
    return value


def _num(x: float, scale: bool) -> str:
    """``x`` as text; with ``scale`` in k/M/G units (1.9k)."""
    if not scale:
        return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


class IntervalRate:
    """A count per second over the interval since the previous reading: ``read()`` returns the
    count added since the last reading that updated it, divided by the seconds since then, and
    starts a new interval.

    Args:
        clock: seconds, monotonic (``time.perf_counter``; tests pass a fake clock).
        min_interval_s: a reading less than this many seconds after the previous update returns
            the previous value and lets the interval go on (a bar refreshed at every step would
            otherwise show each step's own rate again).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, min_interval_s: float = 0.0):
        self.clock, self.min_interval_s = clock, min_interval_s
        self.since = clock()
        self.count = 0.0
        self.value: float | None = None

    def add(self, n: float) -> None:
        """Count ``n`` more (tokens) in the current interval."""
        self.count += n

    def read(self) -> float | None:
        """Count per second over the current interval (then a new interval starts); the previous
        value (None before the first) when no time, or less than ``min_interval_s``, has passed."""
        now = self.clock()
        dt = now - self.since
        if dt <= 0 or dt < self.min_interval_s:
            return self.value
        self.value = self.count / dt
        self.count, self.since = 0.0, now
        return self.value


class Progress:
    """A progress indicator of ``total`` units: a tqdm bar on a terminal, timed plain lines otherwise.

    Args:
        total: units of the whole job (steps, tokens).
        desc: the label starting every line.
        unit: the unit's name (``step``, ``tok``).
        enabled: False makes every call a no-op (ranks other than 0).
        initial: units already done (a resumed run).
        unit_scale: print counts with k/M/G units.
        interval_s: seconds between plain lines (default :func:`every_s`).
        tokens: the label of a token rate to show (``tok/s``), counted from ``update(tokens=)``
            over the interval since the previous line (:class:`IntervalRate`); None: none shown.
        clock: seconds, monotonic (tests pass a fake clock).
    """

    BAR_RATE_INTERVAL_S = 1.0
    """Shortest interval of the token rate on a bar (tqdm's redraw interval, ``mininterval``)."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0,
                 unit_scale: bool = False, interval_s: float | None = None, tokens: str | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n, self.initial, self.unit_scale = initial, initial, unit_scale
        self.every = every_s() if interval_s is None else interval_s
        self.postfix: dict = {}
        self.clock = clock
        self.t0 = self.last = clock()
        self.printed_n = initial
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                            dynamic_ncols=True, mininterval=self.BAR_RATE_INTERVAL_S)
        self.tokens_label = tokens
        self.token_rate = IntervalRate(clock, self.BAR_RATE_INTERVAL_S if self.bar is not None else 0.0)
        if enabled:
            _OPEN.append(self)

    def update(self, n: int = 1, tokens: int = 0, **postfix) -> None:
        """Advance by ``n`` units that processed ``tokens`` tokens; ``postfix`` (e.g.
        ``loss="2.81"``) is shown after the counts and the token rate."""
        if not self.enabled:
            return
        self.n += n
        self.token_rate.add(tokens)
        if postfix:
            self.postfix = postfix
        if self.bar is not None:
            shown = self._shown_postfix(self.token_rate.read())
            if shown:
                self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n)
        elif self.clock() - self.last >= self.every:
            self._line()

    def _shown_postfix(self, token_rate: float | None) -> dict:
        """The postfix with the token rate (when shown and known) first."""
        if self.tokens_label is None or token_rate is None:
            return dict(self.postfix)
        return {self.tokens_label: _num(token_rate, True), **self.postfix}

    def _line(self) -> None:
        now = self.clock()
        elapsed = now - self.t0
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0  # units/s since this process started
        parts = [f"{self.desc}: {_num(self.n, self.unit_scale)}/{_num(self.total, self.unit_scale)} {self.unit}"
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total else ""),
                 f"{_num(rate, True) if self.unit_scale else f'{rate:.2f}'} {self.unit}/s",
                 f"{elapsed:.0f}s elapsed"]
        if rate > 0 and self.total and self.n < self.total:
            parts.append(f"eta {(self.total - self.n) / rate:.0f}s")
        parts += [f"{v} {k}" if k == self.tokens_label else f"{k} {v}"
                  for k, v in self._shown_postfix(self.token_rate.read()).items()]
        print(", ".join(parts), file=sys.stderr, flush=True)
        self.last, self.printed_n = now, self.n

    def write(self, msg: str) -> None:
        """Print ``msg`` on stdout without breaking the bar (see :func:`write`)."""
        write(msg)

    def close(self, final_line: bool = True) -> None:
        """End the bar's line (terminal) or, with ``final_line``, print the final counts if not
        printed yet (log file)."""
        if self in _OPEN:
            _OPEN.remove(self)
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif final_line and self.n != self.printed_n:
            self._line()
        self.enabled = False


def write(msg: str) -> None:
    """Print ``msg`` on stdout; above the bar (``tqdm.write``) when a terminal bar is open."""
    if any(p.bar is not None for p in _OPEN):
        from tqdm import tqdm

        tqdm.write(msg)
    else:
        print(msg, flush=True)


def close_all() -> None:
    """Close every open :class:`Progress` without a final count line (before printing an error)."""
    for p in list(_OPEN):
        p.close(final_line=False)
