"""Sampling: counters over time, rates over a window, and the independent cross-check.

A sample costs what is active, not what is limited: the kernel reports each budget with
traffic once per sample (map `active`), and only those are read; an idle budget's counters
are known not to have moved.  Per-process counters (the data behind ``top``) are read only
while someone needs them.

Every few seconds, limits whose program saw nothing are cross-checked against the kernel's
own TCP counters of their sockets (read by an iterator, independently of the packet
programs): traffic there means the programs are not called for them.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from . import abi, libbpf, names

#: rates are averaged over this many seconds of samples
RATE_WINDOW = 2.0
#: how often limits whose program saw nothing are cross-checked with TCP counters, and how
#: many per pass (a pass costs what those processes hold)
SOCKET_CHECK_INTERVAL = 5.0
CHECKS_PER_PASS = 16


class DirCount(NamedTuple):
    """The counters of one direction of a budget that rates are computed from."""

    passed_bytes: int
    calls: int
    dropped_packets: int
    active: int  # sockets active in the last epoch


def dir_counts(v: abi.Limit) -> tuple[DirCount, DirCount]:
    return tuple(DirCount(v.dir[d].passed_bytes, v.dir[d].calls, v.dir[d].dropped_packets,
                          max(v.dir[d].active, v.dir[d].counting))
                 for d in range(abi.DIRS))  # type: ignore[return-value]


@dataclass
class Window:
    """What one budget did over the rate window."""

    seconds: float
    rate: tuple[float, float] = (0.0, 0.0)
    calls: tuple[int, int] = (0, 0)
    dropped: tuple[int, int] = (0, 0)
    sockets: tuple[int, int] = (0, 0)


@dataclass
class _History:
    points: deque = field(default_factory=deque)  # (t, (DirCount, DirCount))


class Sampler:
    def __init__(self, kernel, budgets) -> None:
        self._kernel = kernel
        self._budgets = budgets
        self._hist: dict[int, _History] = {}
        self._traffic: deque = deque()  # (t, {tgid: (down, up, pkts down, pkts up)})
        self.want_traffic_until = 0.0
        self.samples = 0
        self.last_duration = 0.0
        self._socket: dict[int, tuple[float, int, int]] = {}  # bid -> (t, received, acked)
        self.socket_rate: dict[int, tuple[float, float]] = {}
        self._last_check = 0.0
        # the socket check's turn order: root pids, least recently checked first, rebuilt
        # only when the budgets' roots changed (their generation), so a pass visits the few
        # it checks rather than sorting every budget
        self._turns: deque[int] = deque()
        self._turns_gen = -1

    # -- taking samples -----------------------------------------------------------------------
    def sample(self, *, traffic: bool = False) -> None:
        t0 = time.perf_counter()
        now = time.monotonic()
        k = self._kernel
        k.config.sample_gen += 1
        k.write_config()
        fd = k.fd(names.MAP_LIMITS)
        for bid, _ in libbpf.map_take_all(k.fd(names.MAP_ACTIVE), ctypes.c_uint64,
                                          ctypes.c_uint8, abi.MAX_ACTIVE):
            if bid not in self._budgets.by_bid:
                continue
            v = abi.Limit()
            if not libbpf.map_lookup(fd, ctypes.c_uint64(bid), v):
                continue
            h = self._hist.setdefault(bid, _History())
            h.points.append((now, dir_counts(v)))
            while len(h.points) > 2 and now - h.points[1][0] >= RATE_WINDOW:
                h.points.popleft()
        for bid in [b for b in self._hist if b not in self._budgets.by_bid]:
            del self._hist[bid]
        if traffic or now < self.want_traffic_until:
            self._traffic.append((now, self.read_traffic()))
            while len(self._traffic) > 2 and now - self._traffic[1][0] >= RATE_WINDOW:
                self._traffic.popleft()
        elif self._traffic:
            self._traffic.clear()
        if now - self._last_check >= SOCKET_CHECK_INTERVAL:
            self._last_check = now
            self._check_sockets(now)
        self.samples += 1
        self.last_duration = time.perf_counter() - t0

    def read_traffic(self) -> dict[int, tuple[int, int, int, int]]:
        """Per-process counters summed over CPUs (the map is per-CPU), in batches."""
        per_cpu = abi.Traffic * libbpf.num_possible_cpus()
        out = {}
        for tgid, vals in libbpf.map_lookup_all(self._kernel.fd(names.MAP_PROC_TRAFFIC),
                                                ctypes.c_uint32, per_cpu, abi.MAX_TRAFFIC):
            out[tgid] = (sum(v.bytes[0] for v in vals), sum(v.bytes[1] for v in vals),
                         sum(v.packets[0] for v in vals), sum(v.packets[1] for v in vals))
        return out

    def traffic_of(self, tgid: int) -> tuple[int, int, int, int]:
        vals = (abi.Traffic * libbpf.num_possible_cpus())()
        if libbpf.lib().bpf_map_lookup_elem(self._kernel.fd(names.MAP_PROC_TRAFFIC),
                                            ctypes.byref(ctypes.c_uint32(tgid)),
                                            ctypes.byref(vals)) != 0:
            return (0, 0, 0, 0)
        return (sum(v.bytes[0] for v in vals), sum(v.bytes[1] for v in vals),
                sum(v.packets[0] for v in vals), sum(v.packets[1] for v in vals))

    def forget_traffic(self, live: set[int]) -> None:
        fd = self._kernel.fd(names.MAP_PROC_TRAFFIC)
        if self._traffic:
            for tgid in self._traffic[-1][1]:
                if tgid not in live:
                    libbpf.map_delete(fd, ctypes.c_uint32(tgid))

    # -- windows ------------------------------------------------------------------------------
    def window(self, bid: int) -> Window:
        """Rates of a budget over the last RATE_WINDOW seconds (zero when idle)."""
        h = self._hist.get(bid)
        now = time.monotonic()
        if h is None or len(h.points) < 2:
            return Window(RATE_WINDOW)
        t_end, end = h.points[-1]
        if now - t_end > RATE_WINDOW:  # nothing since: idle
            return Window(RATE_WINDOW)
        start_t, start = h.points[0]
        for t, c in h.points:
            if t <= now - RATE_WINDOW:
                start_t, start = t, c
        # the counters moved between the two points: divide by the time between them (not
        # by the time since start_t until now, which halved the rate just before a sample)
        dt = max(t_end - start_t, 1e-3)
        return Window(
            dt,
            tuple((end[d].passed_bytes - start[d].passed_bytes) / dt for d in range(abi.DIRS)),
            tuple(end[d].calls - start[d].calls for d in range(abi.DIRS)),
            tuple(end[d].dropped_packets - start[d].dropped_packets for d in range(abi.DIRS)),
            tuple(end[d].active for d in range(abi.DIRS)),
        )  # type: ignore[arg-type]

    def active_budgets(self) -> set[int]:
        """Budgets whose program saw packets within the rate window."""
        now = time.monotonic()
        return {bid for bid, h in self._hist.items()
                if len(h.points) >= 2 and now - h.points[-1][0] <= RATE_WINDOW}

    def traffic_window(self) -> tuple[float, dict, dict] | None:
        if len(self._traffic) < 2:
            return None
        (t0, a), (t1, z) = self._traffic[0], self._traffic[-1]
        return t1 - t0, a, z

    # -- the independent check -------------------------------------------------------------
    def _next_idle(self, active: set[int]) -> list[tuple[int, int]]:
        """The next CHECKS_PER_PASS (root pid, budget) pairs whose budget is not active, in
        turn; the turns are rebuilt (least recently checked first) when the roots changed."""
        roots = self._budgets.by_root
        if self._turns_gen != self._budgets.roots_gen:
            self._turns_gen = self._budgets.roots_gen
            self._turns = deque(sorted(roots, key=lambda pid: self._socket.get(
                roots[pid], (0.0, 0, 0))[0]))
        out: list[tuple[int, int]] = []
        for _ in range(len(self._turns)):
            if len(out) >= CHECKS_PER_PASS:
                break
            pid = self._turns.popleft()
            self._turns.append(pid)
            bid = roots.get(pid)
            if bid is not None and bid not in active:
                out.append((pid, bid))
        return out

    def _check_sockets(self, now: float) -> None:
        """TCP byte counters of the sockets of budgets whose program saw nothing lately,
        read through their root processes (an iterator over one process's files each: the
        cost is what they hold, not what the machine runs), at most CHECKS_PER_PASS per
        pass, least recently checked first."""
        active = self.active_budgets()
        for bid in list(self.socket_rate):
            if bid in active or bid not in self._budgets.by_bid:
                del self.socket_rate[bid]
                self._socket.pop(bid, None)
        idle = self._next_idle(active)
        if not idle:
            return
        fd = self._kernel.fd(names.MAP_CHECKS)
        for pid, bid in idle:
            c = abi.Check()
            libbpf.map_update(fd, ctypes.c_uint64(bid), c)
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                libbpf.map_delete(fd, ctypes.c_uint64(bid))
                continue
            try:
                self._kernel.iterate(names.PROG_ITER_FILES, abi.ITER_CHECK, pid_fd=pidfd)
                libbpf.map_lookup(fd, ctypes.c_uint64(bid), c)
            finally:
                os.close(pidfd)
                libbpf.map_delete(fd, ctypes.c_uint64(bid))
            prev = self._socket.get(bid)
            if prev and prev[0] > 0:
                dt = max(now - prev[0], 1e-3)
                self.socket_rate[bid] = (max(c.received - prev[1], 0) / dt,
                                         max(c.acked - prev[2], 0) / dt)
            self._socket[bid] = (now, c.received, c.acked)
