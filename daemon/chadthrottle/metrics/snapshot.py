"""What one scrape shows: plain, immutable data.

The event loop's thread builds a :class:`Snapshot` (:mod:`chadthrottle.metrics.gather`) and
hands it over; the HTTP threads turn it into metric families
(:mod:`chadthrottle.metrics.collector`).  Nothing here refers to the engine, so a snapshot
can be read from any thread once it is published.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

DIRECTIONS = ("download", "upload")


class Counters(NamedTuple):
    """Cumulative counters of one direction (since the limit, rule or daemon began).
    Tuples, not dataclasses: a snapshot makes several per limit, and these are cheaper."""

    bytes: int = 0  # passed
    packets: int = 0  # passed
    dropped_packets: int = 0
    dropped_bytes: int = 0

    def plus(self, other: Counters) -> Counters:
        return Counters(self.bytes + other.bytes, self.packets + other.packets,
                        self.dropped_packets + other.dropped_packets,
                        self.dropped_bytes + other.dropped_bytes)


class Direction(NamedTuple):
    """One direction of a limit: its counters, its rate over the last window, the limit in
    force (0: this direction is not limited) and the verdict (names.STATUS_*)."""

    counters: Counters
    rate: float
    limit: int
    status: str


class LimitRow(NamedTuple):
    """One limit (a budget): the process it was set on or matched for, and its members."""

    pid: int
    comm: str
    rule: str  # "" for a limit set with SetLimit
    unit: str  # the systemd unit of the process's cgroup ("" when none)
    members: int  # processes in the budget now (the process and its descendants)
    dirs: tuple[Direction, Direction]


@dataclass(frozen=True, slots=True)
class UnitRow:
    """One unit limit (SetUnitLimit): a whole cgroup."""

    unit: str  # the cgroup path below the cgroup2 mount, "/system.slice/backup.service"
    dirs: tuple[Direction, Direction]


@dataclass(frozen=True, slots=True)
class RuleDirection:
    counters: Counters  # every limit the rule ever held, ended ones included
    rate: float  # the sum over its limits now
    limit: int  # the rule's rate (per process, or shared for scope=application)
    statuses: tuple[tuple[str, int], ...]  # (status, number of its limits in it)


@dataclass(frozen=True, slots=True)
class RuleRow:
    rule: str
    scope: str
    enabled: bool
    permanent: bool
    processes: int  # processes it limits now
    dirs: tuple[RuleDirection, RuleDirection]


@dataclass(frozen=True, slots=True)
class MapFill:
    """One map of the BPF object.  entries None: not countable (task and socket storage,
    the ring buffer); max_entries is the kernel's own figure (bytes for the ring buffer,
    0 for storage maps, which grow with their tasks or sockets)."""

    name: str
    type: str  # "hash", "lru_percpu_hash", "array", "ringbuf", ...
    entries: int | None
    max_entries: int


@dataclass(frozen=True, slots=True)
class Unlimited:
    """Every process without a limit, as one: the programs' per-process counters of the
    processes that had no limit when they were read."""

    processes: int  # processes without a limit whose counters moved since the last snapshot
    bytes: tuple[int, int]
    packets: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken: float  # time.monotonic() on the loop's thread
    version: str
    limits: tuple[LimitRow, ...] = ()
    units: tuple[UnitRow, ...] = ()
    rules: tuple[RuleRow, ...] = ()
    unlimited: Unlimited = Unlimited(0, (0, 0), (0, 0))
    maps: tuple[MapFill, ...] = ()
    attached_cgroups: int = 0
    budgets: tuple[tuple[str, int], ...] = ()  # (origin, count)
    subscribers: int = 0
    sampling: bool = False
    samples: int = 0
    sample_seconds: float = 0.0
    bus_calls: tuple[tuple[str, int], ...] = ()  # (member, calls)
    kernel: tuple[tuple[str, str, int], ...] = ()  # (counter, direction or "", value)
    build_seconds: float = 0.0  # how long the loop's thread spent building this snapshot
