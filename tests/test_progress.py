"""Progress lines: the token rate is tokens since the previous line ÷ seconds since it, on a fake
clock (no timed tests), in the plain lines and on the bar."""
import re

import pytest

from pipeline.progress import IntervalRate, Progress


class FakeClock:
    """Seconds that move only when the test says so."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def test_interval_rate_is_the_count_since_the_previous_reading():
    clock = FakeClock()
    r = IntervalRate(clock)
    assert r.read() is None  # no time has passed: nothing to divide by
    r.add(600)
    clock.advance(2.0)
    assert r.read() == 300.0
    r.add(50)
    clock.advance(1.0)
    r.add(5000)
    clock.advance(1.0)
    assert r.read() == 2525.0  # (50 + 5000) / 2 s: not the last step's 5000 tok/s
    assert r.read() == 2525.0  # no time since: the previous value, the interval not restarted
    clock.advance(4.0)
    assert r.read() == 0.0  # nothing counted in 4 s


def test_interval_rate_waits_for_its_shortest_interval():
    clock = FakeClock()
    r = IntervalRate(clock, min_interval_s=1.0)
    r.add(100)
    clock.advance(0.5)
    assert r.read() is None  # too early: the interval goes on
    r.add(300)
    clock.advance(0.5)
    assert r.read() == 400.0  # 400 tokens over the whole second
    r.add(10_000)
    clock.advance(0.25)
    assert r.read() == 400.0


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("train:")]


def test_plain_lines_show_the_rate_since_the_previous_line(capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    clock = FakeClock()
    bar = Progress(10, "train", "step", interval_s=10.0, tokens="tok/s", clock=clock)
    # steps of 1, 3 and 6 s with 625, 5582 and 1502 tokens: the last step's rates would be
    # 625, 1861 and 250 tok/s; one line after 10 s shows (625 + 5582 + 1502) / 10
    for secs, toks in ((1.0, 625), (3.0, 5582), (6.0, 1502)):
        clock.advance(secs)
        bar.update(1, tokens=toks, loss="2.5000")
    clock.advance(12.0)
    bar.update(1, tokens=2400, loss="2.4000")  # the second line: 2400 tokens over 12 s
    clock.advance(1.0)
    bar.update(1, tokens=999)
    bar.close()  # the final line: 999 tokens over 1 s
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 3, lines
    assert lines[0] == "train: 3/10 step (30%), 0.30 step/s, 10s elapsed, eta 23s, 771 tok/s, loss 2.5000"
    rates = [re.search(r", ([\d.]+k?) tok/s", line).group(1) for line in lines]
    assert rates == ["771", "200", "999"], lines
    assert lines[0].endswith("loss 2.5000") and lines[1].endswith("loss 2.4000")


def test_no_token_rate_unless_asked(capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    clock = FakeClock()
    bar = Progress(4, "generate", "batch", interval_s=0.0, clock=clock)
    clock.advance(2.0)
    bar.update(1, tokens=100)
    bar.close()
    line = capsys.readouterr().err.strip()
    assert line.startswith("generate: 1/4 batch (25%), 0.50 batch/s") and "tok/s" not in line


@pytest.mark.parametrize("label", ["tok/s", "tok/s on rank 0"])
def test_bar_shows_the_rate_of_its_last_refresh_interval(monkeypatch, label):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    clock = FakeClock()
    bar = Progress(100, "train", "step", tokens=label, clock=clock)
    assert bar.bar is not None
    try:
        clock.advance(0.5)
        bar.update(1, tokens=300, loss="3.0000")
        assert label not in bar.bar.postfix  # under a second: no rate yet
        clock.advance(0.5)
        bar.update(1, tokens=700, loss="2.9000")
        assert bar.bar.postfix == f"{label}=1.0k, loss=2.9000"  # 1000 tokens over 1 s
        clock.advance(0.1)
        bar.update(1, tokens=50_000, loss="2.8000")  # one big step does not replace the rate
        assert bar.bar.postfix == f"{label}=1.0k, loss=2.8000"
        clock.advance(1.9)
        bar.update(1, tokens=950, loss="2.7000")
        assert bar.bar.postfix == f"{label}=25.5k, loss=2.7000"  # 50,950 tokens over 2 s
    finally:
        bar.close()
