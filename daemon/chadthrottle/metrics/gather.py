"""The loop's side of the metrics: read the engine, build a :class:`Snapshot`.

Runs on the event loop's thread only, like everything that touches the engine (the engine's
ownership rule).  Two entry points:

* :meth:`Gatherer.tick`, once a second while metrics are on: cheap bookkeeping that cannot
  wait for a scrape — the last counters of every rule limit that had traffic (so a rule's
  totals keep the bytes of a process that exits between two scrapes) and the counters of
  unit limits (their rates: the sampler keeps rates of budgets only).  It costs what is
  active: no work without rule limits or unit limits.
* :meth:`Gatherer.snapshot`, when a scrape asks: every limit's counters in one batch read of
  the ``limits`` map, rates and verdicts from the sampler, process names from a cache,
  rules, the aggregate of unlimited processes, map fill, daemon gauges.

Counters stay monotonic: a rule's totals are the counters of its live limits plus those of
the limits it held before (kept at their last reading, at most a second old), and the
aggregate of unlimited processes adds each process's growth since the previous snapshot.
"""

from __future__ import annotations

import ctypes
import logging
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from .. import __version__, abi, cgroups, libbpf, names, procfs, verdict
from ..budgets import ORIGIN_RULE
from ..safetext import printable
from ..sampler import RATE_WINDOW
from .mapfill import MapFills
from .snapshot import (
    Counters,
    Direction,
    LimitRow,
    RuleDirection,
    RuleRow,
    Snapshot,
    UnitRow,
    Unlimited,
)

log = logging.getLogger("chadthrottle.metrics")

#: a process name or unit is read again after this long (at once while the limit is busy,
#: so a name changed by exec shows within a scrape)
LABEL_TTL = 60.0
LABEL_TTL_ACTIVE = 1.0
#: the verdicts a limited direction can have (names.STATUS_UNLIMITED is for none)
LIMITED_STATUSES = (names.STATUS_THROTTLED, names.STATUS_NOT_WORKING,
                    names.STATUS_NOT_DROPPING, names.STATUS_PROGRAM_NOT_CALLED)
_ZERO = (Counters(), Counters())


def label(text: str) -> str:
    """A label value from text others chose (process names): control characters escaped
    (a scrape read in a terminal cannot drive it), and always valid UTF-8."""
    return printable(text).encode("utf-8", "backslashreplace").decode("utf-8")


#: passed_bytes, passed_packets, dropped_bytes, dropped_packets: adjacent in ct_bucket
_COUNTS = struct.Struct("=4Q")
_CALLS = struct.Struct("=Q")
_COUNTS_AT = tuple(abi.Limit.dir.offset + d * ctypes.sizeof(abi.Bucket)
                   + abi.Bucket.passed_bytes.offset for d in range(abi.DIRS))
_CALLS_AT = tuple(abi.Limit.dir.offset + d * ctypes.sizeof(abi.Bucket) + abi.Bucket.calls.offset
                  for d in range(abi.DIRS))
assert [abi.Bucket.passed_packets.offset, abi.Bucket.dropped_bytes.offset,
        abi.Bucket.dropped_packets.offset] == [abi.Bucket.passed_bytes.offset + 8 * i
                                               for i in (1, 2, 3)], "ct_bucket layout"


def counters_of(v: abi.Limit) -> tuple[Counters, Counters]:
    """The counters of both directions (struct unpacking: ctypes field access costs several
    times more, and a scrape reads every limit)."""
    out = []
    for off in _COUNTS_AT:
        passed, packets, dropped_bytes, dropped = _COUNTS.unpack_from(v, off)
        out.append(Counters(passed, packets, dropped, dropped_bytes))
    return tuple(out)  # type: ignore[return-value]


class _Points:
    """(time, counters, calls) of one unit limit over the rate window."""

    __slots__ = ("points",)

    def __init__(self) -> None:
        self.points: deque = deque()

    def add(self, now: float, value: Any) -> None:
        self.points.append((now, value))
        while len(self.points) > 2 and now - self.points[1][0] >= RATE_WINDOW:
            self.points.popleft()

    def window(self, now: float) -> tuple[float, Any, Any] | None:
        if len(self.points) < 2 or now - self.points[-1][0] > RATE_WINDOW:
            return None
        (t0, a), (t1, z) = self.points[0], self.points[-1]
        return max(t1 - t0, 1e-3), a, z


class Gatherer:
    def __init__(self, engine, *, rules: Callable[[], Iterable[Any]] = lambda: (),
                 bus_calls: Callable[[], dict[str, int]] = dict,
                 subscribers: Callable[[], int] = lambda: 0,
                 sampling: Callable[[], bool] = lambda: False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """rules: the rules in force (chadthrottle.rules.model.Rule); bus_calls: calls per
        bus member so far; subscribers: Stats subscribers now; sampling: whether the
        sampler runs."""
        self._engine = engine
        self._rules = rules
        self._bus_calls = bus_calls
        self._subscribers = subscribers
        self._sampling = sampling
        self._clock = clock
        kernel = engine.kernel
        self._maps = MapFills(kernel.fds, {names.MAP_RULES: lambda: kernel.config.nrules})
        self._who: dict[int, tuple[int, str, str, float]] = {}  # pid -> (start, comm, unit, t)
        self._rule_last: dict[int, tuple[str, tuple[Counters, Counters]]] = {}  # bid -> ...
        self._rule_retired: dict[str, tuple[Counters, Counters]] = {}
        self._units: dict[int, _Points] = {}  # cgroup id -> points
        self._traffic_last: dict[int, tuple[int, int, int, int]] = {}
        self._unlimited = [0, 0, 0, 0]  # bytes down, up, packets down, up

    # ---- once a second -------------------------------------------------------------------
    def tick(self) -> None:
        budgets = self._engine.budgets
        for bid in self._engine.sampler.active_budgets():  # those with traffic: cheap
            b = budgets.by_bid.get(bid)
            if b is None or b.origin != ORIGIN_RULE:
                continue
            v = budgets.read(bid)
            if v is not None:
                self._rule_last[bid] = (b.rule, counters_of(v))
        if self._rule_last:
            self._retire(budgets.by_bid)
        if len(self._engine.units):
            self._read_units()
        elif self._units:
            self._units.clear()

    def _retire(self, live: dict) -> None:
        """Limits of rules that ended: their last counters join the rule's past."""
        for bid in [bid for bid in self._rule_last if bid not in live]:
            rule, (dn, up) = self._rule_last.pop(bid)
            old = self._rule_retired.get(rule, _ZERO)
            self._rule_retired[rule] = (old[0].plus(dn), old[1].plus(up))

    def _read_units(self) -> dict[int, abi.Limit]:
        now = self._clock()
        values = dict(libbpf.map_lookup_all(self._engine.kernel.fd(names.MAP_UNIT_LIMITS),
                                            ctypes.c_uint64, abi.Limit, abi.MAX_UNITS))
        for cgid, v in values.items():
            calls = tuple(_CALLS.unpack_from(v, off)[0] for off in _CALLS_AT)
            self._units.setdefault(cgid, _Points()).add(now, (counters_of(v), calls))
        for cgid in [c for c in self._units if c not in values]:
            del self._units[cgid]
        return values

    # ---- one scrape -------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        t0 = time.perf_counter()
        e = self._engine
        now = self._clock()
        values = dict(libbpf.map_lookup_all(e.kernel.fd(names.MAP_LIMITS), ctypes.c_uint64,
                                            abi.Limit, e.kernel.max_limits))
        active = e.sampler.active_budgets()
        limits: list[LimitRow] = []
        per_rule: dict[str, list] = {}  # rule -> [(directions, members)] of its limits
        seen_pids: set[int] = set()
        by_origin: dict[str, int] = {}
        for bid, b in list(e.budgets.by_bid.items()):
            by_origin[b.origin] = by_origin.get(b.origin, 0) + 1
            v = values.get(bid)
            if v is None:
                continue
            counters = counters_of(v)
            w = e.sampler.window(bid)
            sock = e.sampler.socket_rate.get(bid, (0.0, 0.0))
            dirs = []
            for d, lim in enumerate((b.download, b.upload)):
                win = verdict.Window(lim, w.rate[d], w.calls[d], w.dropped[d], sock[d])
                dirs.append(Direction(counters[d], w.rate[d], lim, verdict.classify(win)))
            members = max(int(v.members), 0)
            if b.origin == ORIGIN_RULE:
                self._rule_last[bid] = (b.rule, counters)
                per_rule.setdefault(b.rule, []).append((dirs, members))
            if not b.roots:
                continue  # an application rule's budget before its first process: per rule
            pid = min(b.roots)
            seen_pids.add(pid)
            comm, unit = self._labels(pid, b.roots[pid], now, bid in active)
            limits.append(LimitRow(pid, comm, b.rule, unit, members, tuple(dirs)))
        self._retire(e.budgets.by_bid)
        for pid in [p for p in self._who if p not in seen_pids]:
            del self._who[pid]
        limits.sort(key=lambda r: r.pid)
        snap = Snapshot(
            taken=now, version=__version__, limits=tuple(limits), units=self._unit_rows(now),
            rules=self._rule_rows(per_rule), unlimited=self._unlimited_traffic(),
            maps=self._maps.read(), attached_cgroups=len(e.attached_cgroups),
            budgets=tuple(sorted(by_origin.items())), subscribers=int(self._subscribers()),
            sampling=bool(self._sampling()), samples=e.sampler.samples,
            sample_seconds=e.sampler.last_duration,
            bus_calls=tuple(sorted(self._bus_calls().items())), kernel=self._kernel_counters())
        return replace(snap, build_seconds=time.perf_counter() - t0)

    def _labels(self, pid: int, start: int, now: float, busy: bool) -> tuple[str, str]:
        got = self._who.get(pid)
        if got is not None and got[0] == start and now - got[3] < (
                LABEL_TTL_ACTIVE if busy else LABEL_TTL):
            return got[1], got[2]
        comm = unit = ""
        try:
            comm = label(procfs.comm(pid))
            unit = label(cgroups.unit_of(self._engine.cg.of_pid(pid)))
        except Exception:  # noqa: BLE001 - it exited meanwhile: the last names stand
            if got is not None:
                comm, unit = comm or got[1], unit or got[2]
        self._who[pid] = (start, comm, unit, now)
        return comm, unit

    def _unit_rows(self, now: float) -> tuple[UnitRow, ...]:
        units = self._engine.list_unit_limits()
        if not units:
            return ()
        values = self._read_units()
        rows = []
        for u in units:
            v = values.get(u.cgroup_id) if u.cgroup_id else None
            counters = counters_of(v) if v is not None else _ZERO
            win = self._units[u.cgroup_id].window(now) if u.cgroup_id in self._units else None
            dirs = []
            for d, lim in enumerate((u.download, u.upload)):
                rate, calls, dropped = 0.0, 0, 0
                if win is not None:
                    dt, (ca, ka), (cz, kz) = win
                    rate = (cz[d].bytes - ca[d].bytes) / dt
                    calls = kz[d] - ka[d]
                    dropped = cz[d].dropped_packets - ca[d].dropped_packets
                status = verdict.classify(verdict.Window(lim, rate, calls, dropped))
                dirs.append(Direction(counters[d], rate, lim, status))
            rows.append(UnitRow(label(cgroups.display(u.cgroup)), tuple(dirs)))
        return tuple(rows)

    def _rule_rows(self, per_rule: dict[str, list]) -> tuple[RuleRow, ...]:
        rows = []
        known = set()
        for r in self._rules():
            known.add(r.id)
            held = per_rule.get(r.id, [])
            past = self._rule_retired.get(r.id, _ZERO)
            out = []
            for d, lim in enumerate((r.download, r.upload)):
                total, rate = past[d], 0.0
                statuses = dict.fromkeys(LIMITED_STATUSES, 0) if lim else {}
                for dirs, _ in held:
                    total = total.plus(dirs[d].counters)
                    rate += dirs[d].rate
                    if dirs[d].status in statuses:
                        statuses[dirs[d].status] += 1
                out.append(RuleDirection(total, rate, lim, tuple(statuses.items())))
            rows.append(RuleRow(r.id, r.scope, r.enabled, r.permanent,
                                sum(m for _, m in held), tuple(out)))
        for rule in [x for x in self._rule_retired if x not in known]:
            del self._rule_retired[rule]  # removed: its series end
        rows.sort(key=lambda r: r.rule)
        return tuple(rows)

    def _unlimited_traffic(self) -> Unlimited:
        """The growth of every process's counters since the previous snapshot, for the
        processes that are in no budget now."""
        e = self._engine
        traffic = e.sampler.read_traffic()
        limited = {r.tgid for r in e.budgets.census()} if len(e.budgets) else set()
        moved = 0
        acc = self._unlimited
        last = self._traffic_last
        for tgid, cur in traffic.items():
            prev = last.get(tgid)
            last[tgid] = cur
            if tgid in limited or cur == prev:
                continue
            if prev is None or any(c < p for c, p in zip(cur, prev, strict=True)):
                prev = (0, 0, 0, 0)  # new, or evicted and made again
            for i in range(4):
                acc[i] += cur[i] - prev[i]
            moved += 1
        for tgid in [t for t in last if t not in traffic]:
            del last[tgid]
        return Unlimited(moved, (acc[0], acc[1]), (acc[2], acc[3]))

    def _kernel_counters(self) -> tuple[tuple[str, str, int], ...]:
        g = self._engine.global_counters()
        out = []
        for name, ctype in abi.Global._fields_:
            value = getattr(g, name)
            if hasattr(ctype, "_length_"):
                for d, direction in enumerate(("download", "upload")[:ctype._length_]):
                    out.append((name, direction, int(value[d])))
            else:
                out.append((name, "", int(value)))
        return tuple(out)
