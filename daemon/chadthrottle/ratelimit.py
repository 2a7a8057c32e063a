"""A small rate limiter for log lines (and anything else that must not flood).

Any bus user can make the daemon deny or fail thousands of calls a second; one log line
each would flood the journal.  :class:`RateLimiter` lets ``burst`` events per key through
in every ``period`` seconds and counts the rest, so the next line that gets through can say
how many were suppressed::

    limiter = RateLimiter(burst=5, period=10.0)
    log_limited(log, limiter, ("denied", uid), logging.INFO, "denied %s to uid %d", a, uid)

A leaf module (the service and the server both use it; it imports nothing of ours).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class RateLimiter:
    """At most ``burst`` events per key in any window of ``period`` seconds.

    Keys are kept in a bounded LRU (``max_keys``), so an attacker who varies the key
    cannot grow memory either; a key pushed out simply starts afresh.
    """

    def __init__(self, burst: int = 5, period: float = 10.0, *, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if burst < 1 or period <= 0:
            raise ValueError("burst must be >= 1 and period > 0")
        self.burst = burst
        self.period = period
        self._clock = clock
        self._max_keys = max_keys
        # key -> [window start, events let through in this window, suppressed since the
        # last event let through]
        self._state: OrderedDict[Hashable, list] = OrderedDict()

    def allow(self, key: Hashable = None) -> tuple[bool, int]:
        """(True, n) when this event may be logged (n: how many were suppressed since the
        previous one let through for this key), else (False, 0)."""
        now = self._clock()
        st = self._state.get(key)
        if st is None:
            st = [now, 0, 0]
            self._state[key] = st
            if len(self._state) > self._max_keys:
                self._state.popitem(last=False)
        else:
            self._state.move_to_end(key)
        if now - st[0] >= self.period:
            st[0], st[1] = now, 0
        if st[1] < self.burst:
            st[1] += 1
            suppressed, st[2] = st[2], 0
            return True, suppressed
        st[2] += 1
        return False, 0


def log_limited(logger: logging.Logger, limiter: RateLimiter, key: Hashable, level: int,
                msg: str, *args: object) -> bool:
    """``logger.log(level, msg, *args)`` unless ``limiter`` suppresses ``key``; the line
    that gets through after suppressed ones says how many were left out.  True if logged."""
    ok, suppressed = limiter.allow(key)
    if not ok:
        return False
    if suppressed:
        msg += " (%d similar message(s) suppressed)"
        args = (*args, suppressed)
    logger.log(level, msg, *args)
    return True
