"""The one crossing between the HTTP threads and the event loop.

Ownership rule: engine state (and everything the engine's parts hold — maps, fds, caches)
is read and written on the event loop's thread only.  An HTTP thread never calls into the
engine: it asks the loop for a :class:`~chadthrottle.metrics.snapshot.Snapshot` with
:meth:`SnapshotSource.get`, which schedules :meth:`SnapshotSource.refresh` on the loop
(``call_soon_threadsafe``) and waits for its result.  The loop builds the snapshot between
two of its other callbacks, publishes it (one reference assignment) and never changes it
again; the HTTP thread then renders it on its own time.  A snapshot younger than
``max_age`` is served again without asking the loop (several scrapers at once).

If the loop does not answer within ``timeout`` (it is stuck, or stopping), the scrape fails
with :class:`~chadthrottle.errors.MetricsUnavailable` (HTTP 503) rather than show old
figures as new.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable

from ..errors import MetricsUnavailable
from .snapshot import Snapshot

log = logging.getLogger("chadthrottle.metrics")

MAX_AGE = 1.0
TIMEOUT = 5.0


class SnapshotSource:
    def __init__(self, loop: asyncio.AbstractEventLoop, build: Callable[[], Snapshot], *,
                 max_age: float = MAX_AGE, timeout: float = TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """Made on the loop's thread; ``build`` runs there only."""
        self._loop = loop
        self._build = build
        self._max_age = max_age
        self._timeout = timeout
        self._clock = clock
        self._loop_thread = threading.get_ident()
        self.latest: Snapshot | None = None  # written on the loop's thread only

    def _fresh(self) -> Snapshot | None:
        snap = self.latest
        if snap is not None and self._clock() - snap.taken < self._max_age:
            return snap
        return None

    def refresh(self) -> Snapshot:
        """On the loop's thread: a fresh snapshot (or one just built for another scrape)."""
        snap = self._fresh()
        if snap is None:
            snap = self._build()
            self.latest = snap
        return snap

    def get(self) -> Snapshot:
        """From any thread: the snapshot to show now."""
        snap = self._fresh()
        if snap is not None:
            return snap
        if threading.get_ident() == self._loop_thread:
            return self.refresh()
        fut: concurrent.futures.Future[Snapshot] = concurrent.futures.Future()

        def run() -> None:  # on the loop's thread
            if not fut.set_running_or_notify_cancel():
                return  # the scrape gave up meanwhile
            try:
                fut.set_result(self.refresh())
            except Exception as exc:  # noqa: BLE001 - logged here, answered as a 503
                log.exception("gathering metrics failed")
                fut.set_exception(exc)

        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError as exc:  # the loop is closed: the daemon is stopping
            raise MetricsUnavailable("the daemon is stopping") from exc
        try:
            return fut.result(self._timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise MetricsUnavailable(f"the daemon's event loop did not answer within "
                                     f"{self._timeout:g} s") from None
        except Exception as exc:  # noqa: BLE001 - logged on the loop's thread
            raise MetricsUnavailable(f"gathering metrics failed: {exc}") from exc
