"""Budgets: one limit shared by a set of processes, its token buckets and its members.

* A budget is made for a process and its descendants (SetLimit), for one process matched by
  a rule (scope=process), or for every process a rule matches (scope=application).  Ids are
  64-bit and never reused: the daemon counts from 1, the kernel (rule budgets it makes at
  exec) from abi.KERNEL_BID; neither can wrap in the lifetime of a machine.
* Membership lives in the kernel, in task-local storage: it dies with the task, so an exited
  process can never be a member and a reused pid never inherits a budget.  The kernel adds
  children at fork and reports the last member's exit; running trees are enrolled by an
  iterator that visits one process by its pidfd and checks, in the kernel, that it is alive
  and descends from a member (so a pid that was reused meanwhile is refused).
* Sockets that existed before are tagged from the kernel side (iter/task_file finds them,
  iter/tcp and iter/udp tag them): the daemon never holds another process's file
  descriptor.
* The buckets' state belongs to the kernel once created; a change writes new settings
  (limit_cfg) that the next packet copies in under the bucket's lock.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from dataclasses import dataclass, field

from . import abi, libbpf, names, procfs
from .errors import InvalidLimit, NoSuchProcess, Unsupported
from .shaping.pacing import mss_for, slack_for

log = logging.getLogger("chadthrottle.budgets")

#: burst = BURST_SECONDS of the rate, at least BURST_MIN bytes = one 64 KiB GSO/GRO segment
#: (DESIGN §3b: about 200 ms of the rate keeps TCP out of its minimum RTO when the backstop
#: has to act).
BURST_SECONDS = 0.2
BURST_MIN = 64 * 1024
#: descendants are listed this many times (children forked while their parent was being
#: enrolled appear in the next listing; once a parent is in, the kernel adds its children)
ENROLL_PASSES = 3

ORIGIN_EXPLICIT = "explicit"
ORIGIN_RULE = "rule"


def check_rate(rate: int, what: str) -> int:
    if not isinstance(rate, int) or isinstance(rate, bool):
        raise InvalidLimit(f"{what} rate must be an integer number of bytes per second")
    if rate != 0 and not names.RATE_MIN <= rate <= names.RATE_MAX:
        raise InvalidLimit(f"{what} rate {rate} B/s is outside 0 or "
                           f"{names.RATE_MIN}..{names.RATE_MAX} B/s")
    return rate


def burst_for(rate: int) -> int:
    return max(int(rate * BURST_SECONDS), BURST_MIN) if rate else 0


@dataclass(slots=True)
class Budget:
    bid: int
    download: int
    upload: int
    burst_download: int
    burst_upload: int
    origin: str = ORIGIN_EXPLICIT
    rule: str = ""           # the rule's id (ORIGIN_RULE)
    owner_uid: int = 0       # who set it (ORIGIN_EXPLICIT): changing it needs as much
    persistent: bool = False  # lives with no member (an application rule's budget)
    roots: dict[int, int] = field(default_factory=dict)  # pid -> start time
    gen: int = 1

    @property
    def mss(self) -> int:
        return mss_for(self.download, self.upload)


class Budgets:
    def __init__(self, kernel, attachments, pacer) -> None:
        self._kernel = kernel
        self._attach = attachments
        self._pacer = pacer
        self._next_bid = 1
        self.by_bid: dict[int, Budget] = {}
        self.by_root: dict[int, int] = {}  # root pid -> budget id
        self.gen = 0  # bumped on every change of a root or a rate (caches of listings)
        self.roots_gen = 0  # bumped when by_root changes (the socket check's turns)
        #: called with (budget id, download rate) when a budget's download rate changes or
        #: the budget goes (rate 0): its download queue follows
        self.listeners: list = []

    # -- ids -------------------------------------------------------------------------------
    def _allocate(self) -> int:
        bid = self._next_bid
        if bid >= abi.KERNEL_BID:  # 2^62 budgets: not in the lifetime of a machine
            raise InvalidLimit("budget ids are exhausted; restart the daemon")
        self._next_bid += 1
        return bid

    def __len__(self) -> int:
        return len(self.by_bid)

    # -- the kernel side of one budget ---------------------------------------------------
    def create(self, download: int, upload: int, *, burst_download: int | None = None,
               burst_upload: int | None = None, origin: str = ORIGIN_EXPLICIT,
               rule: str = "", owner_uid: int = 0, persistent: bool = False,
               root_tgid: int = 0) -> Budget:
        bd = burst_for(download) if burst_download is None else int(burst_download)
        bu = burst_for(upload) if burst_upload is None else int(burst_upload)
        for burst, rate in ((bd, download), (bu, upload)):
            if rate and not 0 < burst <= names.RATE_MAX:
                raise InvalidLimit(f"burst {burst} bytes is out of range")
        b = Budget(self._allocate(), download, upload, bd, bu, origin, rule, owner_uid,
                   persistent)
        cfg = self._cfg(b)
        lim = abi.Limit()
        now = time.monotonic_ns()  # the kernel's bpf_ktime_get_ns clock
        for d, (rate, burst) in enumerate(((download, bd), (upload, bu))):
            lim.dir[d].rate, lim.dir[d].burst, lim.dir[d].slack = rate, burst, cfg.slack[d]
            lim.dir[d].tokens = 1 if rate else 0  # nearly empty: no free first burst
            lim.dir[d].last_ns = now
        lim.cfg_gen = self._kernel.config.cfg_gen
        lim.set_gen = cfg.gen
        lim.root_tgid = root_tgid
        lim.mss = cfg.mss
        key = ctypes.c_uint64(b.bid)
        try:
            libbpf.map_update(self._kernel.fd(names.MAP_LIMIT_CFG), key, cfg, libbpf.BPF_NOEXIST)
            libbpf.map_update(self._kernel.fd(names.MAP_LIMITS), key, lim, libbpf.BPF_NOEXIST)
        except OSError as exc:
            libbpf.map_delete(self._kernel.fd(names.MAP_LIMIT_CFG), key)
            if exc.errno == errno.E2BIG:
                raise Unsupported(
                    f"no room for another limit: the kernel holds at most "
                    f"{self._kernel.max_limits:,} (max_limits in chadthrottled.toml)") from exc
            raise
        self.by_bid[b.bid] = b
        self._kernel.set_flag(abi.CFG_BUDGETS, True)
        for fn in self.listeners:
            fn(b.bid, b.download)
        return b

    def adopt(self, bid: int, *, rule: str, download: int, upload: int, burst_download: int,
              burst_upload: int) -> Budget:
        """Register a budget the kernel made at exec (a scope=process rule)."""
        b = self.by_bid.get(bid)
        if b is None:
            b = Budget(bid, download, upload, burst_download, burst_upload, ORIGIN_RULE, rule)
            self.by_bid[bid] = b
            for fn in self.listeners:
                fn(b.bid, b.download)
        return b

    @staticmethod
    def _cfg(b: Budget) -> abi.LimitCfg:
        cfg = abi.LimitCfg()
        cfg.rate[abi.DIR_DOWNLOAD], cfg.rate[abi.DIR_UPLOAD] = b.download, b.upload
        cfg.burst[abi.DIR_DOWNLOAD], cfg.burst[abi.DIR_UPLOAD] = b.burst_download, b.burst_upload
        mss = b.mss
        cfg.slack[abi.DIR_DOWNLOAD] = slack_for(b.download, mss)
        cfg.slack[abi.DIR_UPLOAD] = slack_for(b.upload, mss)
        cfg.gen = b.gen
        cfg.mss = mss
        return cfg

    def change(self, b: Budget, download: int, upload: int, *,
               burst_download: int | None = None, burst_upload: int | None = None) -> bool:
        """New rates for a budget, without a gap: the kernel copies them in on the next
        packet; sockets are re-paced at once.  True if anything changed."""
        bd = burst_for(download) if burst_download is None else int(burst_download)
        bu = burst_for(upload) if burst_upload is None else int(burst_upload)
        if (b.download, b.upload, b.burst_download, b.burst_upload) == (download, upload, bd, bu):
            return False
        b.download, b.upload, b.burst_download, b.burst_upload = download, upload, bd, bu
        b.gen += 1
        self.gen += 1
        libbpf.map_update(self._kernel.fd(names.MAP_LIMIT_CFG), ctypes.c_uint64(b.bid),
                          self._cfg(b))
        self._kernel.bump_cfg_gen()
        if self.had_traffic(b.bid):  # its sockets take the new share now, not at the next ack
            self._pacer.repace()
        for fn in self.listeners:
            fn(b.bid, b.download)
        return True

    def delete(self, b: Budget, *, repace: bool = True) -> None:
        """Forget a budget.  Its members keep a stale id in their storage, which nothing
        honours (every user of it checks that the budget exists; ids are never reused), so
        this is O(1) whatever the budget's size; paced sockets are released at once."""
        traffic = repace and self.had_traffic(b.bid)
        self.by_bid.pop(b.bid, None)
        self.gen += 1
        for pid in list(b.roots):
            if self.by_root.get(pid) == b.bid:
                del self.by_root[pid]
        self.roots_gen += 1
        key = ctypes.c_uint64(b.bid)
        libbpf.map_delete(self._kernel.fd(names.MAP_LIMITS), key)
        libbpf.map_delete(self._kernel.fd(names.MAP_LIMIT_CFG), key)
        if not self.by_bid:
            self._kernel.set_flag(abi.CFG_BUDGETS, False)
        if repace and traffic:  # paced sockets are released at once
            self._pacer.repace()
        for fn in self.listeners:
            fn(b.bid, 0)

    def had_traffic(self, bid: int) -> bool:
        """Did any packet of this budget pass the programs (so it may have paced sockets)?"""
        v = self.read(bid)
        return v is None or any(v.dir[d].calls for d in range(abi.DIRS))

    def read(self, bid: int) -> abi.Limit | None:
        v = abi.Limit()
        if libbpf.map_lookup(self._kernel.fd(names.MAP_LIMITS), ctypes.c_uint64(bid), v,
                             libbpf.BPF_F_LOCK):
            return v
        return None

    # -- members -----------------------------------------------------------------------------
    def add_root(self, b: Budget, proc: procfs.Process) -> None:
        self.gen += 1
        b.roots[proc.pid] = proc.start_time
        self.by_root[proc.pid] = b.bid
        self.roots_gen += 1

    def drop_root(self, b: Budget, pid: int) -> None:
        self.gen += 1
        b.roots.pop(pid, None)
        if self.by_root.get(pid) == b.bid:
            del self.by_root[pid]
        self.roots_gen += 1

    def enroll(self, b: Budget, proc: procfs.Process, *, rule_slot: int = 0) -> list[int]:
        """Put a running process and its descendants in the budget (the root first: from
        then on the kernel adds the children it forks), tag their existing sockets, and
        pace them.  Returns the pids enrolled; NoSuchProcess if the root is not alive.
        rule_slot: the kernel rule slot (+1) behind it; 0 for an explicit SetLimit."""
        arg = (abi.TASK_EXPLICIT if b.origin == ORIGIN_EXPLICIT else 0) | (rule_slot << 8)
        self._attach.ensure_for_pid(proc.pid)
        self._kernel.iterate(names.PROG_ITER_TASK, abi.ITER_ENROLL, budget=b.bid,
                             tgid=proc.pid, arg=arg, pid_fd=proc.pidfd)
        task = self._kernel.task_of(proc.pidfd)
        if task is None or task.state != (b.bid | abi.COUNTED) or not proc.alive():
            raise NoSuchProcess(f"process {proc.pid} has exited")
        enrolled = [proc.pid]
        fds = [proc.pidfd]
        opened: list[int] = []
        try:
            seen = {proc.pid}
            for _ in range(ENROLL_PASSES):
                new = [c for c in procfs.descendants(proc.pid) if c not in seen]
                if not new:
                    break
                for pid in new:
                    seen.add(pid)
                    try:
                        fd = os.pidfd_open(pid)
                    except OSError:
                        continue  # gone already
                    opened.append(fd)
                    # tgid 0: the kernel enrolls it only if it descends from a member
                    self._kernel.iterate(names.PROG_ITER_TASK, abi.ITER_ENROLL, budget=b.bid,
                                         tgid=0, arg=arg, pid_fd=fd)
                    t = self._kernel.task_of(fd)
                    if t is not None and t.state == (b.bid | abi.COUNTED):
                        enrolled.append(pid)
                        fds.append(fd)
                        try:
                            self._attach.ensure_for_pid(pid)
                        except NoSuchProcess:
                            pass
            out = self._kernel.tag_sockets(abi.ITER_TAG, budget=b.bid, pid_fds=fds)
            tagged = len(out) // 8
        finally:
            for fd in opened:
                os.close(fd)
        if tagged:
            log.debug("budget %d: tagged %d existing socket(s)", b.bid, tagged)
            self._pacer.repace()
        return enrolled

    def mark_root(self, b: Budget, proc: procfs.Process) -> None:
        """Mark a member as a root of its budget (its exit is then reported)."""
        arg = abi.TASK_EXPLICIT if b.origin == ORIGIN_EXPLICIT else 0
        self._kernel.iterate(names.PROG_ITER_TASK, abi.ITER_ENROLL, budget=b.bid,
                             tgid=proc.pid, arg=arg, pid_fd=proc.pidfd)

    def release(self, b: Budget, proc: procfs.Process) -> int:
        """Take a process and its descendants out of a budget that stays (a shared one)."""
        n = 0
        fds = [proc.pidfd]
        opened = []
        try:
            for pid in procfs.descendants(proc.pid):
                try:
                    fd = os.pidfd_open(pid)
                except OSError:
                    continue
                opened.append(fd)
                fds.append(fd)
            for fd in fds:
                out = self._kernel.iterate(names.PROG_ITER_TASK, abi.ITER_RELEASE,
                                           budget=b.bid, pid_fd=fd)
                n += len(out) // ctypes.sizeof(abi.MemberRec)
            self._kernel.tag_sockets(abi.ITER_TAG, budget=b.bid, pid_fds=fds)
        finally:
            for fd in opened:
                os.close(fd)
        self._pacer.repace()
        return n

    def forget_kernel_budget(self, bid: int) -> None:
        """A budget the kernel made at exec whose process was gone before it could join."""
        key = ctypes.c_uint64(bid)
        libbpf.map_delete(self._kernel.fd(names.MAP_LIMITS), key)
        libbpf.map_delete(self._kernel.fd(names.MAP_LIMIT_CFG), key)

    def budget_of(self, proc: procfs.Process) -> tuple[int, int, int] | None:
        """(budget id, ct_task flags, rule slot + 1) of a process in a live budget."""
        t = self._kernel.task_of(proc.pidfd)
        if t is None or not t.state & abi.COUNTED:
            return None
        bid = t.state & abi.BID_MASK
        if bid not in self.by_bid:
            return None
        return bid, t.flags, t.rule

    def census(self, bid: int = 0) -> list[abi.MemberRec]:
        """Members of one budget (bid) or of every budget, from one pass over all tasks."""
        raw = self._kernel.iterate(names.PROG_ITER_TASK, abi.ITER_CENSUS, budget=bid)
        size = ctypes.sizeof(abi.MemberRec)
        recs = [abi.MemberRec.from_buffer_copy(raw, i) for i in range(0, len(raw), size)]
        return [r for r in recs if r.budget in self.by_bid]

    def members(self, bid: int) -> list[int]:
        return sorted(r.tgid for r in self.census(bid))
