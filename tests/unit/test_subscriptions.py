"""Stats subscriptions bookkeeping (issue 10, DESIGN §2b: Subscribe / Unsubscribe)."""

from __future__ import annotations

import pytest

from chadthrottle import names
from chadthrottle.errors import LimitsExceeded
from chadthrottle.service.subscriptions import Subscriptions, clamp_interval


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_issue10_interval_is_clamped():
    assert clamp_interval(0) == names.STATS_INTERVAL_MIN_MS == 250
    assert clamp_interval(1) == 250
    assert clamp_interval(1000) == 1000
    assert clamp_interval(2**32 - 1) == names.STATS_INTERVAL_MAX_MS == 10_000


def test_issue10_subscribe_schedule_and_resubscribe():
    clock = Clock()
    changes = []
    subs = Subscriptions(clock=clock, on_change=lambda: changes.append(1))
    subs.subscribe(":1.1", 1000, 1000)
    subs.subscribe(":1.2", 1000, 1)  # -> 250 ms
    assert len(subs) == 2 and len(changes) == 2
    assert subs.next_due() == pytest.approx(1000.25)
    clock.t = 1000.25
    assert subs.take_due() == [":1.2"]
    clock.t = 1001.0
    assert sorted(subs.take_due()) == [":1.1", ":1.2"]
    # fell far behind: the next one is one interval from now, not a burst of catch-ups
    clock.t = 1010.0
    assert sorted(subs.take_due()) == [":1.1", ":1.2"]
    assert subs.take_due() == []
    assert subs.next_due() == pytest.approx(1010.25)
    subs.subscribe(":1.2", 1000, 5000)  # again: a new interval, still one subscription
    assert len(subs) == 2 and subs.get(":1.2").interval_ms == 5000


def test_issue10_unsubscribe_and_forget():
    subs = Subscriptions(clock=Clock())
    subs.subscribe(":1.1", 1000, 1000)
    assert subs.unsubscribe(":1.1") and not subs.unsubscribe(":1.1")
    subs.subscribe(":1.2", 1000, 1000)
    assert subs.forget(":1.2") and len(subs) == 0 and subs.next_due() is None
    # a Subscribe that raced with its caller leaving the bus is not kept
    subs.forget(":1.3")
    assert subs.subscribe(":1.3", 1000, 1000) is None and ":1.3" not in subs


def test_issue10_per_user_quota_root_exempt():
    subs = Subscriptions(per_user=3, clock=Clock())
    for i in range(3):
        subs.subscribe(f":1.{i}", 1000, 1000)
    with pytest.raises(LimitsExceeded):
        subs.subscribe(":1.9", 1000, 1000)
    subs.subscribe(":1.0", 1000, 2000)  # re-timing an existing one is fine
    subs.subscribe(":1.9", 1001, 1000)  # another user
    for i in range(10):
        subs.subscribe(f":2.{i}", 0, 1000)  # root
    assert len(subs) == 14
