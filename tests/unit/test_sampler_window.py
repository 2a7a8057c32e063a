"""Rates over the sampler's window (issue 11): the bytes between two samples divided by the
time between those samples, whenever the rate is read — before the fix, a read just before
the next sample divided one second of bytes by two seconds (half the rate)."""

from __future__ import annotations

import pytest

from chadthrottle import sampler as sampler_mod
from chadthrottle.sampler import RATE_WINDOW, DirCount, Sampler, _History

RATE = 1_048_576  # bytes/s, both directions


def counts(t: float) -> tuple[DirCount, DirCount]:
    n = int(RATE * t)
    return (DirCount(n, int(16 * t), 0, 1), DirCount(n // 2, int(16 * t), 0, 1))


def with_samples(times: list[float]) -> Sampler:
    s = Sampler(kernel=None, budgets=None)
    h = s._hist.setdefault(1, _History())
    for t in times:
        h.points.append((t, counts(t)))
    return s


@pytest.mark.parametrize("after_last", [0.001, 0.25, 0.5, 0.9, 0.999, 1.0, 1.3])
def test_the_rate_does_not_depend_on_when_it_is_read(monkeypatch, after_last) -> None:
    s = with_samples([100.0, 101.0, 102.0])  # once a second, as the daemon samples
    monkeypatch.setattr(sampler_mod.time, "monotonic", lambda: 102.0 + after_last)
    w = s.window(1)
    assert w.rate[0] == pytest.approx(RATE, rel=1e-6)
    assert w.rate[1] == pytest.approx(RATE / 2, rel=1e-6)


def test_samples_a_little_late_still_give_the_rate(monkeypatch) -> None:
    s = with_samples([100.0, 101.03, 102.07])
    monkeypatch.setattr(sampler_mod.time, "monotonic", lambda: 103.05)
    assert s.window(1).rate[0] == pytest.approx(RATE, rel=1e-3)


def test_an_idle_budget_has_no_rate(monkeypatch) -> None:
    s = with_samples([100.0, 101.0, 102.0])
    monkeypatch.setattr(sampler_mod.time, "monotonic", lambda: 102.0 + RATE_WINDOW + 0.01)
    assert s.window(1).rate == (0.0, 0.0)
    assert with_samples([100.0]).window(1).rate == (0.0, 0.0)
