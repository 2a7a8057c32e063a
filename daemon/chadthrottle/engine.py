"""The throttling engine: limits, socket tagging, process lifecycle and statistics.

No D-Bus here: the bus layer calls these methods and translates errors.  Not thread-safe:
the daemon drives it from one asyncio loop.

Model
-----
* A *budget* is one limit: a pid P and its descendants (present and future) share it.  Budget
  ids are allocated here, never reused within a run, and are not pids, so a recycled pid can
  never inherit an old budget.  proc_budget maps tgid -> budget id; the kernel adds children
  at fork and drops a process when its last thread exits.
* Sockets carry the tgid that created them (sock_create); sockets opened before the limit
  are tagged here through pidfd_getfd.
* Programs attach once per *stable parent* cgroup (see cgroups.stable_parent/plan_attach).
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from . import abi, cgroups, libbpf, names, procfs, verdict
from .bpfobject import BpfObject, Link
from .errors import InvalidLimit, NoSuchLimit, NoSuchProcess, NoSuchUnit, Unsupported

log = logging.getLogger(__name__)

#: burst = BURST_SECONDS of the rate, at least BURST_MIN bytes = one 64 KiB GSO/GRO segment, so
#: tokens are not capped below what one packet needs (DESIGN §3b: about 200 ms of
#: the rate keeps TCP out of its 200 ms minimum RTO; a 64 KiB bucket collapses fast flows).
BURST_SECONDS = 0.2
BURST_MIN = 64 * 1024
#: tokens a new bucket starts with: a full bucket would let the first second through at
#: rate + burst; starting nearly empty keeps the first second close to the limit.
INITIAL_TOKENS = 1
#: rates (GetStats, ListProcesses) are averaged over this many seconds of samples
RATE_WINDOW = 2.0
#: how often a limit whose program saw nothing is cross-checked with the sockets' TCP_INFO,
#: and how many such checks one sample may do (bounds a sample with thousands of idle limits)
SOCKET_CHECK_INTERVAL = 5.0
SOCKET_CHECKS_PER_SAMPLE = 32

CGROUP_PROGRAMS = (names.PROG_SOCK_CREATE, names.PROG_INGRESS, names.PROG_EGRESS)
TRACING_PROGRAMS = (names.PROG_FORK, names.PROG_EXIT)


@dataclass(frozen=True)
class Limit:
    pid: int
    download: int  # bytes/s, 0 = unlimited in that direction
    upload: int
    burst_download: int  # bucket depth in bytes
    burst_upload: int


@dataclass(frozen=True)
class UnitLimit:
    cgroup: str  # path relative to the cgroup2 mount ("" = the root)
    cgroup_id: int
    download: int
    upload: int


@dataclass(frozen=True)
class ProcessStats:
    pid: int
    comm: str
    cgroup: str  # "/"-prefixed path relative to the cgroup2 mount
    download_limit: int
    upload_limit: int
    download_rate: float  # bytes/s over the last window
    upload_rate: float
    download_bytes: int  # cumulative bytes passed
    upload_bytes: int
    download_packets: int
    upload_packets: int
    download_dropped: int  # packets
    upload_dropped: int
    download_dropped_bytes: int
    upload_dropped_bytes: int
    program_calls: int  # BPF program invocations for this process's (budget's) packets
    status: str  # names.STATUS_*
    download_calls: int = 0
    upload_calls: int = 0
    download_socket_rate: float = 0.0  # TCP_INFO cross-check, only when the program saw none
    upload_socket_rate: float = 0.0


@dataclass
class _Budget:
    bid: int
    pid: int
    pidfd: int
    start_time: int
    download: int
    upload: int
    burst_download: int
    burst_upload: int
    members: set[int] = field(default_factory=set)  # enrolled from user space
    socket_prev: tuple[float, int, int] | None = None  # (time, received, acked)
    socket_rate: tuple[float, float] = (0.0, 0.0)
    socket_checked: float = 0.0


@dataclass
class _Unit:
    rel: str
    cgroup_id: int
    level: int
    download: int
    upload: int


class _DirCount(NamedTuple):
    """The counters of one direction of a budget that rates are computed from."""

    passed_bytes: int
    calls: int
    dropped_packets: int


@dataclass
class _Sample:
    t: float
    budgets: dict[int, tuple[_DirCount, _DirCount]] = field(default_factory=dict)  # pid ->
    traffic: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)


def check_rate(rate: int, what: str) -> int:
    if not isinstance(rate, int) or isinstance(rate, bool):
        raise InvalidLimit(f"{what} rate must be an integer number of bytes per second")
    if rate != 0 and not names.RATE_MIN <= rate <= names.RATE_MAX:
        raise InvalidLimit(f"{what} rate {rate} B/s is outside 0 or "
                           f"{names.RATE_MIN}..{names.RATE_MAX} B/s")
    return rate


def burst_for(rate: int) -> int:
    return max(int(rate * BURST_SECONDS), BURST_MIN) if rate else 0


class Engine:
    def __init__(self, *, object_path: str | Path | None = None,
                 cgroup_root: str | Path | None = None, monitor_root: bool = False):
        self._object_path = object_path
        self._cgroup_root = cgroup_root
        self.monitor_root = monitor_root
        self.obj: BpfObject | None = None
        self.cg: cgroups.Cgroups | None = None
        self._fds: dict[str, int] = {}
        self._attached: dict[str, list[Link]] = {}
        self._budgets: dict[int, _Budget] = {}  # pid -> budget
        self._units: dict[str, _Unit] = {}
        self._next_bid = 1
        self._samples: deque[_Sample] = deque()
        self._sample_count = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def open(self) -> Engine:
        if self.obj:
            return self
        cgroups.check_kernel()
        self.cg = cgroups.Cgroups(self._cgroup_root)
        obj = BpfObject(self._object_path)
        try:
            obj.load()
        except OSError as exc:
            raise Unsupported(f"cannot load the BPF object {obj.path}: {exc}") from exc
        self.obj = obj
        try:
            for m in (names.MAP_SK_TAG, names.MAP_PROC_BUDGET, names.MAP_LIMITS,
                      names.MAP_UNIT_LIMITS, names.MAP_PROC_TRAFFIC, names.MAP_CONFIG,
                      names.MAP_GLOBAL_STATS):
                self._fds[m] = obj.map_fd(m)
            for p in TRACING_PROGRAMS:
                obj.attach_tracing(p)
            if self.monitor_root:
                self._ensure_attached("")
        except Exception:
            self.close()
            raise
        log.info("BPF object loaded from %s (cgroup2 at %s)", obj.path, self.cg.root)
        return self

    def close(self) -> None:
        """Remove every limit, detach every program, free the object."""
        for b in list(self._budgets.values()):
            os.close(b.pidfd)
        self._budgets.clear()
        self._units.clear()
        self._attached.clear()
        if self.obj:
            obj, self.obj = self.obj, None
            obj.close()
        self._fds.clear()

    def __enter__(self) -> Engine:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _need(self) -> None:
        if not self.obj:
            raise RuntimeError("engine is not open")

    def program_fd(self, name: str) -> int:
        self._need()
        assert self.obj
        return self.obj.program_fd(name)

    def map_fd(self, name: str) -> int:
        """File descriptor of one of the object's maps (for inspection and tests)."""
        return self._fds[name]

    # ---- attachment --------------------------------------------------------------------------
    @property
    def attached_cgroups(self) -> list[str]:
        return sorted(cgroups.display(p) for p in self._attached)

    def _ensure_attached(self, rel_parent: str) -> None:
        assert self.obj and self.cg
        target, obsolete = cgroups.plan_attach(self._attached, rel_parent)
        if target is None:
            return
        path = self.cg.abspath(target)
        log.info("Attaching eBPF programs to parent cgroup (path: %s)", path)
        links: list[Link] = []
        try:
            for prog in CGROUP_PROGRAMS:
                links.append(self.obj.attach_cgroup(prog, path))
        except OSError as exc:
            for link in reversed(links):
                self.obj.detach(link)
            raise Unsupported(f"cannot attach to cgroup {path}: {exc}") from exc
        self._attached[target] = links
        log.info("Successfully attached eBPF programs to %s", cgroups.display(target))
        for d in obsolete:  # now covered by the new ancestor attachment
            for link in reversed(self._attached.pop(d)):
                self.obj.detach(link)
            log.info("Detached from %s (covered by %s)", cgroups.display(d),
                     cgroups.display(target))

    def _attach_for_pid(self, pid: int) -> str:
        assert self.cg
        rel = self.cg.of_pid(pid)
        parent = cgroups.stable_parent(rel)
        log.debug("PID %d cgroup: %s -> attaching to parent: %s", pid, cgroups.display(rel),
                  cgroups.display(parent))
        self._ensure_attached(parent)
        return rel

    # ---- per-process limits ------------------------------------------------------------------
    def _check_target(self, pid: int) -> None:
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise NoSuchProcess(f"no process {pid!r}")
        procfs.check_process(pid)
        if pid == 1:
            raise InvalidLimit("pid 1 cannot be limited: it would limit the whole system")
        if pid == os.getpid():
            raise InvalidLimit("the daemon cannot limit itself")

    def set_limit(self, pid: int, download: int, upload: int, *,
                  burst_download: int | None = None,
                  burst_upload: int | None = None) -> Limit | None:
        """Limit pid and its descendants as one budget; again changes it; 0/0 removes it
        (returns None then)."""
        self._need()
        check_rate(download, "download")
        check_rate(upload, "upload")
        self._check_target(pid)
        if download == 0 and upload == 0:
            if pid in self._budgets:
                self.clear_limit(pid)
            return None
        bd = burst_for(download) if burst_download is None else int(burst_download)
        bu = burst_for(upload) if burst_upload is None else int(burst_upload)
        for b, r in ((bd, download), (bu, upload)):
            if r and not 0 < b <= names.RATE_MAX:
                raise InvalidLimit(f"burst {b} bytes is out of range")
        existing = self._budgets.get(pid)
        if existing and self._alive(existing):
            return self._change(existing, download, upload, bd, bu)
        if existing:  # the process died and its pid was reused: start over
            self._drop_budget(existing)
        return self._create(pid, download, upload, bd, bu)

    def _alive(self, b: _Budget) -> bool:
        try:
            return procfs.start_time(b.pid) == b.start_time and not _pidfd_exited(b.pidfd)
        except NoSuchProcess:
            return False

    def _fill_bucket(self, bucket: abi.Bucket, rate: int, burst: int, now: int,
                     keep: bool) -> None:
        if not keep or bucket.rate == 0:
            bucket.tokens = min(INITIAL_TOKENS, burst) if rate else 0
            bucket.last_ns = now
        bucket.rate = rate
        bucket.burst = burst
        bucket.tokens = min(bucket.tokens, burst)

    def _create(self, pid: int, download: int, upload: int, bd: int, bu: int) -> Limit:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError as exc:
            raise NoSuchProcess(f"no process {pid}") from exc
        try:
            start = procfs.start_time(pid)
            if len(self._budgets) >= abi.MAX_LIMITS:
                raise InvalidLimit(f"too many limits (at most {abi.MAX_LIMITS})")
            self._attach_for_pid(pid)
            bid = self._next_bid
            self._next_bid += 1
            value = abi.Limit()
            now = time.monotonic_ns()
            self._fill_bucket(value.dir[abi.DIR_DOWNLOAD], download, bd, now, keep=False)
            self._fill_bucket(value.dir[abi.DIR_UPLOAD], upload, bu, now, keep=False)
            libbpf.map_update(self._fds[names.MAP_LIMITS], ctypes.c_uint32(bid), value)
        except BaseException:
            os.close(pidfd)
            raise
        budget = _Budget(bid, pid, pidfd, start, download, upload, bd, bu)
        self._budgets[pid] = budget
        try:
            self._enroll(budget)
        except BaseException:
            self._drop_budget(budget)
            raise
        log.info("PID %d (%s): limit download=%d B/s upload=%d B/s (budget %d, burst %d/%d)",
                 pid, procfs.comm(pid), download, upload, bid, bd, bu)
        return self._limit(budget)

    def _enroll(self, b: _Budget) -> None:
        """Put pid and its current descendants in the budget and tag their sockets.  The
        kernel enrolls children forked from now on; a second pass catches forks that raced
        the first."""
        fd = self._fds[names.MAP_PROC_BUDGET]
        bid = ctypes.c_uint32(b.bid)
        members = [b.pid]
        libbpf.map_update(fd, ctypes.c_uint32(b.pid), bid)
        for _ in range(2):
            for child in procfs.descendants(b.pid):
                if child not in members:
                    members.append(child)
                    libbpf.map_update(fd, ctypes.c_uint32(child), bid)
        b.members.update(members)
        self._write_config(bump_members=True)
        for m in members:
            try:
                self._attach_for_pid(m)
            except NoSuchProcess:
                continue
            self._tag_sockets(m)

    def _tag_sockets(self, pid: int) -> int:
        """Tag sockets that existed before (created before the programs were attached, or by
        another process and inherited).  Returns how many were tagged."""
        tag = abi.SkTag(tgid=pid, budget=0, gen=2**64 - 1)  # no cached budget yet
        n = 0
        with procfs.inet_sockets(pid) as socks:
            for _, s in socks:
                try:
                    libbpf.map_update(self._fds[names.MAP_SK_TAG], ctypes.c_int(s.fileno()), tag)
                    n += 1
                except OSError as exc:
                    log.debug("PID %d: cannot tag socket: %s", pid, exc)
        if n:
            log.debug("PID %d: tagged %d existing socket(s)", pid, n)
        return n

    def _change(self, b: _Budget, download: int, upload: int, bd: int, bu: int) -> Limit:
        fd = self._fds[names.MAP_LIMITS]
        key = ctypes.c_uint32(b.bid)
        value = abi.Limit()
        if not libbpf.map_lookup(fd, key, value, libbpf.BPF_F_LOCK):
            value = abi.Limit()
        now = time.monotonic_ns()
        self._fill_bucket(value.dir[abi.DIR_DOWNLOAD], download, bd, now, keep=True)
        self._fill_bucket(value.dir[abi.DIR_UPLOAD], upload, bu, now, keep=True)
        libbpf.map_update(fd, key, value, libbpf.BPF_F_LOCK)
        b.download, b.upload, b.burst_download, b.burst_upload = download, upload, bd, bu
        self._enroll(b)  # children forked before the change that the kernel did not see
        log.info("PID %d: limit changed to download=%d B/s upload=%d B/s", b.pid, download,
                 upload)
        return self._limit(b)

    @staticmethod
    def _limit(b: _Budget) -> Limit:
        return Limit(b.pid, b.download, b.upload, b.burst_download, b.burst_upload)

    def clear_limit(self, pid: int) -> None:
        self._need()
        b = self._budgets.get(pid) if isinstance(pid, int) else None
        if b is None:
            raise NoSuchLimit(f"process {pid} has no limit")
        self._drop_budget(b)
        log.info("PID %d: limit cleared", pid)

    def _drop_budget(self, b: _Budget) -> None:
        """Forget a budget.  Members enrolled from user space are removed here; children the
        kernel enrolled at fork point to a budget id that no longer exists (never reused),
        so they pass unlimited, and leave the map at exit or at the next sweep."""
        self._budgets.pop(b.pid, None)
        fd = self._fds[names.MAP_PROC_BUDGET]
        v = ctypes.c_uint32()
        for member in b.members:
            if libbpf.map_lookup(fd, ctypes.c_uint32(member), v) and v.value == b.bid:
                libbpf.map_delete(fd, ctypes.c_uint32(member))
        self._write_config(bump_members=True)
        libbpf.map_delete(self._fds[names.MAP_LIMITS], ctypes.c_uint32(b.bid))
        os.close(b.pidfd)

    def list_limits(self) -> list[Limit]:
        return [self._limit(b) for b in sorted(self._budgets.values(), key=lambda b: b.pid)]

    def limit_pidfd(self, pid: int) -> int:
        """A pidfd that turns readable when the limited process exits (for an event loop)."""
        b = self._budgets.get(pid)
        if b is None:
            raise NoSuchLimit(f"process {pid} has no limit")
        return b.pidfd

    def reap(self) -> list[int]:
        """Remove the limits of processes that have exited; returns their pids."""
        gone = [self._budgets[pid] for pid in _exited({b.pidfd: pid for pid, b in
                                                       self._budgets.items()})]
        for b in gone:
            self._drop_budget(b)
            log.info("PID %d exited: limit removed", b.pid)
        return [b.pid for b in gone]

    def members(self, pid: int) -> list[int]:
        """Processes currently in pid's budget (the kernel's view)."""
        b = self._budgets.get(pid)
        if b is None:
            raise NoSuchLimit(f"process {pid} has no limit")
        return sorted(self._member_table().get(b.bid, []))

    def _member_table(self) -> dict[int, list[int]]:
        """budget id -> member tgids, from one walk of proc_budget (the kernel's view)."""
        table: dict[int, list[int]] = {}
        for member, bid in libbpf.map_lookup_all(self._fds[names.MAP_PROC_BUDGET],
                                                 ctypes.c_uint32, ctypes.c_uint32,
                                                 abi.MAX_MEMBERS):
            table.setdefault(bid, []).append(member)
        return table

    def _sweep_members(self) -> None:
        """Remove proc_budget entries of budgets that no longer exist."""
        live = {b.bid for b in self._budgets.values()}
        fd = self._fds[names.MAP_PROC_BUDGET]
        stale = [m for bid, ms in self._member_table().items() if bid not in live for m in ms]
        for m in stale:
            libbpf.map_delete(fd, ctypes.c_uint32(m))
        if stale:
            self._write_config(bump_members=True)

    # ---- per-cgroup (unit) limits ------------------------------------------------------------
    def set_unit_limit(self, unit_or_cgroup: str, download: int, upload: int) -> UnitLimit | None:
        self._need()
        assert self.cg
        check_rate(download, "download")
        check_rate(upload, "upload")
        if not isinstance(unit_or_cgroup, str):
            raise NoSuchUnit(f"no such unit or cgroup: {unit_or_cgroup!r}")
        rel = self.cg.resolve(unit_or_cgroup)
        if rel == "":
            raise InvalidLimit("the cgroup2 root cannot be limited: it would limit the system")
        if download == 0 and upload == 0:
            if rel in self._units:
                self.clear_unit_limit(rel)
            return None
        lvl = cgroups.level(rel)
        if lvl >= abi.MAX_LEVELS:
            raise Unsupported(f"cgroup {rel} is {lvl} levels deep; at most "
                              f"{abi.MAX_LEVELS - 1} are supported")
        cid = self.cg.cgroup_id(rel)
        self._ensure_attached(cgroups.stable_parent(rel))
        fd = self._fds[names.MAP_UNIT_LIMITS]
        key = ctypes.c_uint64(cid)
        value = abi.Limit()
        keep = libbpf.map_lookup(fd, key, value, libbpf.BPF_F_LOCK)
        now = time.monotonic_ns()
        self._fill_bucket(value.dir[abi.DIR_DOWNLOAD], download, burst_for(download), now, keep)
        self._fill_bucket(value.dir[abi.DIR_UPLOAD], upload, burst_for(upload), now, keep)
        libbpf.map_update(fd, key, value, libbpf.BPF_F_LOCK if keep else libbpf.BPF_ANY)
        self._units[rel] = _Unit(rel, cid, lvl, download, upload)
        self._write_config()
        log.info("cgroup %s: limit download=%d B/s upload=%d B/s", cgroups.display(rel),
                 download, upload)
        return UnitLimit(rel, cid, download, upload)

    def clear_unit_limit(self, unit_or_cgroup: str) -> None:
        self._need()
        assert self.cg
        rel = self.cg.resolve(unit_or_cgroup) if isinstance(unit_or_cgroup, str) else None
        u = self._units.pop(rel, None) if rel is not None else None
        if u is None:
            raise NoSuchLimit(f"{unit_or_cgroup!r} has no limit")
        libbpf.map_delete(self._fds[names.MAP_UNIT_LIMITS], ctypes.c_uint64(u.cgroup_id))
        self._write_config()
        log.info("cgroup %s: limit cleared", cgroups.display(rel or ""))

    def list_unit_limits(self) -> list[UnitLimit]:
        return [UnitLimit(u.rel, u.cgroup_id, u.download, u.upload)
                for u in sorted(self._units.values(), key=lambda u: u.rel)]

    def _write_config(self, bump_members: bool = False) -> None:
        """Rewrite the config entry.  bump_members: proc_budget changed, so every socket's
        cached budget must be looked up again (the kernel bumps it at fork and exit too;
        racing with those bumps is harmless: either side moves the generation)."""
        levels = 0
        for u in self._units.values():
            levels |= 1 << u.level
        fd = self._fds[names.MAP_CONFIG]
        cfg = abi.Config()
        libbpf.map_lookup(fd, ctypes.c_uint32(0), cfg)
        cfg.unit_levels = levels
        if bump_members:
            cfg.member_gen += 1
        libbpf.map_update(fd, ctypes.c_uint32(0), cfg)

    # ---- statistics --------------------------------------------------------------------------
    def _read_budget(self, b: _Budget) -> abi.Limit:
        v = abi.Limit()
        libbpf.map_lookup(self._fds[names.MAP_LIMITS], ctypes.c_uint32(b.bid), v,
                          libbpf.BPF_F_LOCK)
        return v

    def _read_traffic(self) -> dict[int, tuple[int, int, int, int]]:
        """Per-process counters summed over CPUs (the map is per-CPU), in batches."""
        per_cpu = abi.Traffic * libbpf.num_possible_cpus()
        out = {}
        for tgid, vals in libbpf.map_lookup_all(self._fds[names.MAP_PROC_TRAFFIC],
                                                ctypes.c_uint32, per_cpu, abi.MAX_TRAFFIC):
            out[tgid] = (sum(v.bytes[0] for v in vals), sum(v.bytes[1] for v in vals),
                         sum(v.packets[0] for v in vals), sum(v.packets[1] for v in vals))
        return out

    def _traffic_of(self, tgid: int) -> tuple[int, int, int, int]:
        vals = (abi.Traffic * libbpf.num_possible_cpus())()
        if libbpf.lib().bpf_map_lookup_elem(self._fds[names.MAP_PROC_TRAFFIC],
                                            ctypes.byref(ctypes.c_uint32(tgid)),
                                            ctypes.byref(vals)) != 0:
            return (0, 0, 0, 0)
        return (sum(v.bytes[0] for v in vals), sum(v.bytes[1] for v in vals),
                sum(v.packets[0] for v in vals), sum(v.packets[1] for v in vals))

    def global_counters(self) -> abi.Global:
        """Whole-program counters summed over CPUs."""
        ncpu = libbpf.num_possible_cpus()
        arr = (abi.Global * ncpu)()
        libbpf.check(libbpf.lib().bpf_map_lookup_elem(
            self._fds[names.MAP_GLOBAL_STATS], ctypes.byref(ctypes.c_uint32(0)),
            ctypes.byref(arr)), "global stats")
        total = abi.Global()
        for g in arr:
            for d in range(abi.DIRS):
                total.calls[d] += g.calls[d]
                total.untagged[d] += g.untagged[d]
                total.dropped[d] += g.dropped[d]
        return total

    def sample(self) -> None:
        """Take a snapshot of every counter; rates are computed between snapshots.  Call it
        about once a second."""
        self._need()
        now = time.monotonic()
        s = _Sample(now)
        by_bid = {b.bid: pid for pid, b in self._budgets.items()}
        # one batch read of every budget (counters only: no lock needed for a snapshot)
        for bid, v in libbpf.map_lookup_all(self._fds[names.MAP_LIMITS], ctypes.c_uint32,
                                            abi.Limit, abi.MAX_LIMITS):
            pid = by_bid.get(bid)
            if pid is not None:
                s.budgets[pid] = tuple(  # type: ignore[assignment]
                    _DirCount(v.dir[d].passed_bytes, v.dir[d].calls, v.dir[d].dropped_packets)
                    for d in range(abi.DIRS))
        s.traffic = self._read_traffic()
        self._samples.append(s)
        while len(self._samples) > 2 and now - self._samples[1].t >= RATE_WINDOW:
            self._samples.popleft()
        self._check_sockets(now)
        self._sample_count += 1
        if self._sample_count % 10 == 0:
            self._forget_dead(s.traffic)
            self._sweep_members()

    def _forget_dead(self, traffic: dict[int, tuple[int, int, int, int]]) -> None:
        fd = self._fds[names.MAP_PROC_TRAFFIC]
        for tgid in traffic:
            if not os.path.exists(f"/proc/{tgid}"):
                libbpf.map_delete(fd, ctypes.c_uint32(tgid))

    def _window(self) -> tuple[_Sample, _Sample] | None:
        if len(self._samples) < 2:
            return None
        return self._samples[0], self._samples[-1]

    def _check_sockets(self, now: float) -> None:
        """Cross-check limits whose program saw nothing with the sockets' own TCP counters
        (the kernel's independent count): traffic there means the program is not called."""
        w = self._window()
        table: dict[int, list[int]] | None = None  # built at most once per sample
        budget_left = SOCKET_CHECKS_PER_SAMPLE
        # least recently checked first, so every idle limit gets its turn
        for pid, b in sorted(self._budgets.items(), key=lambda kv: kv[1].socket_checked):
            calls = 0
            if w and pid in w[0].budgets and pid in w[1].budgets:
                calls = sum(w[1].budgets[pid][d].calls - w[0].budgets[pid][d].calls
                            for d in range(abi.DIRS))
            if calls or not w:
                b.socket_prev, b.socket_rate = None, (0.0, 0.0)
                continue
            if now - b.socket_checked < SOCKET_CHECK_INTERVAL and b.socket_prev:
                continue
            if budget_left <= 0:
                continue
            budget_left -= 1
            b.socket_checked = now
            recv = acked = 0
            if table is None:
                table = self._member_table()
            for m in table.get(b.bid, []):
                with procfs.inet_sockets(m) as socks:
                    for _, s in socks:
                        c = procfs.tcp_counters(s)
                        if c:
                            recv += c[0]
                            acked += c[1]
            if b.socket_prev:
                t0, r0, a0 = b.socket_prev
                dt = max(now - t0, 1e-3)
                b.socket_rate = (max(recv - r0, 0) / dt, max(acked - a0, 0) / dt)
            b.socket_prev = (now, recv, acked)

    def stats(self, pid: int) -> ProcessStats:
        """Statistics of any process, limited or not."""
        self._need()
        assert self.cg
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise NoSuchProcess(f"no process {pid!r}")
        procfs.check_process(pid)
        return self._stats(pid, self.cg.of_pid(pid))

    def _stats(self, pid: int, rel: str) -> ProcessStats:
        w = self._window()
        dt = (w[1].t - w[0].t) if w else 0.0
        b = self._budgets.get(pid)
        if b is not None:
            cur = self._read_budget(b)
            dirs = []
            for d, limit in ((abi.DIR_DOWNLOAD, b.download), (abi.DIR_UPLOAD, b.upload)):
                bk = cur.dir[d]
                rate = calls = dropped = 0.0
                if w and dt > 0 and pid in w[0].budgets and pid in w[1].budgets:
                    a, z = w[0].budgets[pid][d], w[1].budgets[pid][d]
                    rate = (z.passed_bytes - a.passed_bytes) / dt
                    calls = z.calls - a.calls
                    dropped = z.dropped_packets - a.dropped_packets
                win = verdict.Window(limit, rate, int(calls), int(dropped), b.socket_rate[d])
                dirs.append((bk, win))
            status = verdict.worst([verdict.classify(win) for _, win in dirs])
            (dn, wd), (up, wu) = dirs
            return ProcessStats(
                pid=pid, comm=procfs.comm(pid), cgroup=cgroups.display(rel),
                download_limit=b.download, upload_limit=b.upload,
                download_rate=wd.rate, upload_rate=wu.rate,
                download_bytes=dn.passed_bytes, upload_bytes=up.passed_bytes,
                download_packets=dn.passed_packets, upload_packets=up.passed_packets,
                download_dropped=dn.dropped_packets, upload_dropped=up.dropped_packets,
                download_dropped_bytes=dn.dropped_bytes, upload_dropped_bytes=up.dropped_bytes,
                program_calls=dn.calls + up.calls, status=status,
                download_calls=dn.calls, upload_calls=up.calls,
                download_socket_rate=wd.socket_rate, upload_socket_rate=wu.socket_rate,
            )
        t = self._traffic_of(pid)
        rd = ru = 0.0
        if w and dt > 0 and pid in w[1].traffic:
            a = w[0].traffic.get(pid, (0, 0, 0, 0))
            z = w[1].traffic[pid]
            rd, ru = (z[0] - a[0]) / dt, (z[1] - a[1]) / dt
        return ProcessStats(
            pid=pid, comm=procfs.comm(pid), cgroup=cgroups.display(rel),
            download_limit=0, upload_limit=0, download_rate=rd, upload_rate=ru,
            download_bytes=t[0], upload_bytes=t[1],
            download_packets=t[2], upload_packets=t[3],
            download_dropped=0, upload_dropped=0, download_dropped_bytes=0,
            upload_dropped_bytes=0, program_calls=t[2] + t[3],
            status=names.STATUS_UNLIMITED, download_calls=t[2], upload_calls=t[3],
        )

    def active_limits(self) -> list[int]:
        """Limited pids whose program saw packets in the last window, whose sockets moved
        bytes the program did not see, or that are too new to tell.  Cheap: no /proc."""
        w = self._window()
        out = []
        for pid, b in self._budgets.items():
            if not w or pid not in w[0].budgets or pid not in w[1].budgets:
                out.append(pid)
            elif any(w[1].budgets[pid][d].calls != w[0].budgets[pid][d].calls
                     for d in range(abi.DIRS)) or any(b.socket_rate):
                out.append(pid)
        return sorted(out)

    def list_processes(self) -> list[ProcessStats]:
        """Stats of every process that moved bytes in the last window, busiest first."""
        self._need()
        assert self.cg
        w = self._window()
        if not w:
            return []
        moved = {pid for pid, z in w[1].traffic.items()
                 if z[:2] != w[0].traffic.get(pid, (0, 0, 0, 0))[:2]}
        for pid in self._budgets:
            if pid in w[0].budgets and pid in w[1].budgets:
                a, z = w[0].budgets[pid], w[1].budgets[pid]
                if any(z[d].passed_bytes != a[d].passed_bytes for d in range(abi.DIRS)):
                    moved.add(pid)
        out = []
        for pid in moved:
            try:
                out.append(self._stats(pid, self.cg.of_pid(pid)))
            except (NoSuchProcess, Unsupported):
                continue
        out.sort(key=lambda s: s.download_rate + s.upload_rate, reverse=True)
        return out


def _pidfd_exited(pidfd: int) -> bool:
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def _exited(pidfds: dict[int, int]) -> list[int]:
    """The pids whose pidfd is readable (the process exited), in one poll(2)."""
    p = select.poll()
    for fd in pidfds:
        p.register(fd, select.POLLIN)
    return [pidfds[fd] for fd, _ in p.poll(0)]
