"""Who gets the unicast ``Stats`` signal, and when (DESIGN §2b: Subscribe / Unsubscribe).

Bookkeeping only — no bus, no engine: the bus layer calls :meth:`Subscriptions.subscribe`
and :meth:`~Subscriptions.unsubscribe` for callers, :meth:`~Subscriptions.forget` when a
unique name leaves the bus (NameOwnerChanged), and the daemon's Stats loop asks
:meth:`~Subscriptions.next_due` and :meth:`~Subscriptions.take_due`.

* one subscription per connection (unique name); subscribing again changes the interval;
* the interval is clamped to STATS_INTERVAL_MIN_MS … STATS_INTERVAL_MAX_MS;
* a user other than root holds at most ``per_user`` subscriptions (LimitsExceeded beyond),
  so one user cannot make the daemon marshal Stats for thousands of connections;
* a name that already left the bus is remembered (unique names are never reused), so a
  Subscribe that raced with its caller's disconnection is not kept forever.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .. import names
from ..errors import LimitsExceeded

PER_USER = 16
DEPARTED_MEMORY = 4096


@dataclass
class Subscriber:
    name: str  # the caller's unique bus name, e.g. ":1.42"
    uid: int
    interval_ms: int
    due: float  # monotonic seconds of the next Stats


def clamp_interval(interval_ms: int) -> int:
    return max(names.STATS_INTERVAL_MIN_MS, min(names.STATS_INTERVAL_MAX_MS, int(interval_ms)))


class Subscriptions:
    def __init__(self, *, per_user: int = PER_USER, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[], None] | None = None) -> None:
        self._subs: dict[str, Subscriber] = {}
        self._per_user = per_user
        self._clock = clock
        self._departed: OrderedDict[str, None] = OrderedDict()
        self.on_change = on_change or (lambda: None)

    def __len__(self) -> int:
        return len(self._subs)

    def __contains__(self, name: object) -> bool:
        return name in self._subs

    def get(self, name: str) -> Subscriber | None:
        return self._subs.get(name)

    def subscribe(self, name: str, uid: int, interval_ms: int) -> Subscriber | None:
        """Start (or re-time) Stats for ``name``; None when ``name`` has left the bus."""
        if name in self._departed:
            return None
        ms = clamp_interval(interval_ms)
        sub = self._subs.get(name)
        if sub is None:
            if uid != 0 and sum(s.uid == uid for s in self._subs.values()) >= self._per_user:
                raise LimitsExceeded(f"uid {uid} already has {self._per_user} Stats "
                                     f"subscriptions")
            sub = Subscriber(name, uid, ms, 0.0)
            self._subs[name] = sub
        sub.interval_ms = ms
        sub.due = self._clock() + ms / 1000.0
        self.on_change()
        return sub

    def unsubscribe(self, name: str) -> bool:
        if self._subs.pop(name, None) is None:
            return False
        self.on_change()
        return True

    def forget(self, name: str) -> bool:
        """``name`` left the bus: drop its subscription and remember that it left."""
        self._departed[name] = None
        if len(self._departed) > DEPARTED_MEMORY:
            self._departed.popitem(last=False)
        return self.unsubscribe(name)

    def next_due(self) -> float | None:
        return min((s.due for s in self._subs.values()), default=None)

    def take_due(self, now: float | None = None) -> list[str]:
        """The names whose Stats are due now; each is rescheduled one interval later (or
        one interval from now, when the loop fell behind)."""
        now = self._clock() if now is None else now
        out = []
        for s in self._subs.values():
            if s.due <= now:
                out.append(s.name)
                step = s.interval_ms / 1000.0
                s.due = s.due + step if s.due + step > now else now + step
        return out
