"""Progress reporting that reads well both on a terminal and in a log file.

On a terminal (``sys.stderr.isatty()``) a :class:`Progress` is a tqdm bar redrawn in place. In
a log file (batch jobs, ``2> log``, pipes) it prints one plain line on stderr every N seconds
instead (tqdm would write every redraw to the file, joined by ``\\r``)::

    train: 120/400 step (30%), 4.1 step/s, 29s elapsed, eta 68s, loss 2.8091, tok_s 5040

``KD_PROGRESS_EVERY_S`` (seconds, default 30) sets the interval; ``0`` prints every update.
Messages meant to sit between bar redraws go through :func:`write`; :func:`close_all` ends any
open bar's line, so an error printed after it starts on a line of its own.
"""
from __future__ import annotations

import os
import sys
import time

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
    """

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0,
                 unit_scale: bool = False, interval_s: float | None = None):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.n, self.initial, self.unit_scale = initial, initial, unit_scale
        self.every = every_s() if interval_s is None else interval_s
        self.postfix: dict = {}
        self.t0 = self.last = time.perf_counter()
        self.printed_n = initial
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                            dynamic_ncols=True, mininterval=1.0)
        if enabled:
            _OPEN.append(self)

    def update(self, n: int = 1, **postfix) -> None:
        """Advance by ``n`` units; ``postfix`` (e.g. ``loss="2.81"``) is shown after the counts."""
        if not self.enabled:
            return
        self.n += n
        if postfix:
            self.postfix = postfix
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif time.perf_counter() - self.last >= self.every:
            self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        elapsed = now - self.t0
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0  # units/s since this process started
        parts = [f"{self.desc}: {_num(self.n, self.unit_scale)}/{_num(self.total, self.unit_scale)} {self.unit}"
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total else ""),
                 f"{_num(rate, True) if self.unit_scale else f'{rate:.2f}'} {self.unit}/s",
                 f"{elapsed:.0f}s elapsed"]
        if rate > 0 and self.total and self.n < self.total:
            parts.append(f"eta {(self.total - self.n) / rate:.0f}s")
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
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
