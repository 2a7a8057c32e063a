"""The log rate limiter (issue 7, item 6: a flood of denials must not flood the journal)."""

from __future__ import annotations

import logging

from chadthrottle.ratelimit import RateLimiter, log_limited


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_issue7_polkit_flood_rate_limiter_burst_then_window():
    clock = Clock()
    rl = RateLimiter(burst=3, period=10.0, clock=clock)
    assert [rl.allow("k")[0] for _ in range(5)] == [True, True, True, False, False]
    assert rl.allow("other") == (True, 0)  # keys are independent
    clock.t += 10.0
    assert rl.allow("k") == (True, 2)  # the next line says two were suppressed
    assert rl.allow("k") == (True, 0)


def test_issue7_polkit_flood_rate_limiter_bounded_keys():
    rl = RateLimiter(burst=1, period=60.0, max_keys=8, clock=Clock())
    for i in range(10_000):
        rl.allow(i)
    assert len(rl._state) == 8


def test_issue7_polkit_flood_log_limited_counts_suppressed(caplog):
    clock = Clock()
    rl = RateLimiter(burst=2, period=10.0, clock=clock)
    log = logging.getLogger("chadthrottle.test")
    with caplog.at_level(logging.INFO, logger="chadthrottle.test"):
        sent = [log_limited(log, rl, "denied", logging.INFO, "denied %s", n) for n in range(500)]
        clock.t += 11
        log_limited(log, rl, "denied", logging.INFO, "denied %s", "late")
    assert sum(sent) == 2
    assert [r.getMessage() for r in caplog.records] == [
        "denied 0", "denied 1", "denied late (498 similar message(s) suppressed)"]
