"""The opt-in metrics endpoint as the daemon runs it: the registry (the snapshot collector,
plus ``prometheus_client``'s own collectors of this process — ``process_*`` CPU, memory and
file descriptors, ``python_info``), the HTTP server, and the once-a-second bookkeeping.

::

    endpoint = MetricsEndpoint(address, gatherer, loop)
    endpoint.start()                     # binds; OSError says why it cannot
    task = loop.create_task(endpoint.ticks())
    ...
    endpoint.close()

Made, started and closed on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)

from ..config import ListenAddress
from .collector import SnapshotCollector
from .gather import Gatherer
from .http import MetricsServer
from .source import SnapshotSource

log = logging.getLogger("chadthrottle.metrics")

TICK_INTERVAL = 1.0


def make_registry(source: SnapshotSource) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(source.get))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class MetricsEndpoint:
    def __init__(self, address: ListenAddress, gatherer: Gatherer,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.address = address
        self.gatherer = gatherer
        self.source = SnapshotSource(loop, gatherer.snapshot)
        self.registry = make_registry(self.source)
        self.server = MetricsServer(address, make_wsgi_app(self.registry))

    def start(self) -> None:
        self.server.start()
        log.info("metrics on %s (OpenMetrics / Prometheus text)", self.address)
        if not self.address.is_loopback:
            log.warning("metrics on %s are reachable from other machines: they show the pid, "
                        "name and unit of every limited process", self.address)

    async def ticks(self) -> None:
        while True:
            await asyncio.sleep(TICK_INTERVAL)
            try:
                self.gatherer.tick()
            except Exception:
                log.exception("metrics bookkeeping failed")

    def close(self) -> None:
        self.server.close()
