"""The engine: the one facade the daemon calls.  Mechanism only — no bus, no policy files.

Its parts, one concern each:

* kernel.py      the loaded BPF object, its maps, iterators and events
* attach.py      where the programs attach (the stable-parent set)
* budgets.py     budgets, members, buckets (SetLimit and rule budgets)
* unitlimits.py  limits of whole cgroups
* kmatch.py      rules decided at exec, in the kernel
* shaping/       pacing and queues: how a limit is held without dropping
* sampler.py     counters over time, rates, the independent socket check

Not thread-safe: the daemon drives it from one asyncio loop (ownership rule: only the loop's
thread touches the engine).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from . import abi, cgroups, cgwatch, names, procfs, verdict
from .attach import Attachments
from .budgets import ORIGIN_EXPLICIT, ORIGIN_RULE, Budget, Budgets, burst_for, check_rate
from .errors import InvalidLimit, NoSuchLimit, NoSuchProcess, Unsupported
from .kernel import Kernel
from .kmatch import ExecMatcher, KernelRule
from .safetext import printable as safe
from .sampler import RATE_WINDOW, Sampler
from .shaping.pacing import Pacer
from .shaping.queues import Queues
from .unitlimits import UnitLimit, UnitLimits

log = logging.getLogger(__name__)

#: ListProcesses keeps per-process sampling on this long after it was last asked
TRAFFIC_LINGER = 10.0

__all__ = ["Engine", "Limit", "UnitLimit", "ProcessStats", "Notice", "KernelRule",
           "check_rate", "burst_for", "ORIGIN_EXPLICIT", "ORIGIN_RULE"]


@dataclass(frozen=True)
class Limit:
    pid: int
    download: int  # bytes/s, 0 = unlimited in that direction
    upload: int
    burst_download: int  # bucket depth in bytes
    burst_upload: int
    origin: str = ORIGIN_EXPLICIT
    rule: str = ""
    owner_uid: int = 0
    start_time: int = 0
    budget: int = 0


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
    download_socket_rate: float = 0.0  # TCP counters cross-check, only when the program saw none
    upload_socket_rate: float = 0.0
    download_sockets: int = 0  # sockets active in the last 100 ms (sharing the rate)
    upload_sockets: int = 0
    download_queued: int = 0  # bytes waiting in the limit's download queue (remote senders)
    download_queue_dropped: int = 0  # packets the queue dropped
    exe: str = ""
    uid: int | None = None
    unit: str = ""
    rule: str = ""
    budget_pid: int = 0  # the pid the limit was set on (0: none)


@dataclass(frozen=True)
class Notice:
    """Something the daemon should know: kind is one of the NOTICE_* below."""

    kind: str
    pid: int = 0
    other: int = 0
    rule: str = ""
    detail: str = ""


NOTICE_EXITED = "exited"        # the limit of pid ended: its last member exited
NOTICE_MOVED = "moved"          # the limit of pid now belongs to `other` (pid exited)
NOTICE_RULE = "rule"            # the kernel enrolled pid for rule (for `other`, which
                                # exec'd the matched program and exited at once, if set)
NOTICE_EXEC = "exec"            # pid exec'd and rule slot `other` needs user space to decide
NOTICE_FULL = "full"            # a map was full (detail says which)


class Engine:
    def __init__(self, *, object_path: str | Path | None = None,
                 cgroup_root: str | Path | None = None, monitor_root: bool = False,
                 pace_local_peers: bool = True, queues: bool = True,
                 max_limits: int | None = None):
        """pace_local_peers: pace the sender of a limited connection when it is a socket on
        this host (exact, lossless); queues: queue remote senders' packets of limited sockets
        (ifb + htb devices the engine owns) instead of leaving them to the backstop;
        max_limits: room for that many limits (budgets) in the kernel (abi.MAX_LIMITS)."""
        self.max_limits = max_limits
        self._object_path = object_path
        self._cgroup_root = cgroup_root
        self.monitor_root = monitor_root
        self.pace_local_peers = pace_local_peers
        self.use_queues = queues
        self.queues: Queues | None = None
        self.kernel: Kernel | None = None
        self.cg: cgroups.Cgroups | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def open(self) -> Engine:
        if self.kernel:
            return self
        cgroups.check_kernel()
        self.cg = cgroups.Cgroups(self._cgroup_root)
        kernel = Kernel(self._object_path, max_limits=self.max_limits)
        try:
            kernel.load()
        except OSError as exc:
            kernel.close()
            raise Unsupported(f"cannot load the BPF object {kernel.path}: {exc}") from exc
        self.kernel = kernel
        try:
            kernel.set_flag(abi.CFG_PEERS, self.pace_local_peers)
            self.watches = cgwatch.Watches(kernel)
            self.attachments = Attachments(kernel, self.cg, self.watches)
            self.pacer = Pacer(kernel)
            self.budgets = Budgets(kernel, self.attachments, self.pacer)
            self.units = UnitLimits(kernel, self.cg, self.attachments, self.watches, self.pacer)
            self.matcher = ExecMatcher(kernel)
            self.sampler = Sampler(kernel, self.budgets)
            self.budgets.listeners.append(
                lambda bid, rate: self.attachments.watch_socket_use(bool(len(self.budgets))))
            queues = Queues(kernel)
            queues.cleanup_leftovers()  # what a crashed run left never keeps limiting
            kernel.set_flag(abi.CFG_QUEUES, self.use_queues)
            if self.use_queues:
                self.queues = queues
                self.budgets.listeners.append(lambda bid, rate: queues.changed(bid, False, rate))
                self.units.listeners.append(lambda cid, rate: queues.changed(cid, True, rate))
            else:
                queues.close()
            self.attachments.open(monitor_root=self.monitor_root)
            self.pacer.release_orphans()  # what a killed run left paced never keeps limiting
        except Exception:
            self.close()
            raise
        log.info("BPF object loaded from %s (cgroup2 at %s)", kernel.path, self.cg.root)
        return self

    def close(self) -> None:
        """Detach every program, remove every device and qdisc the engine added, free the
        object: every limit ends with it."""
        if self.kernel:
            if self.budgets is not None:
                self.budgets.listeners.clear()
                self.units.listeners.clear()
            if self.pacer and self.budgets and len(self.budgets):
                # release paced sockets before the programs go (nothing re-paces them later)
                for b in list(self.budgets.by_bid.values()):
                    self.budgets.delete(b, repace=False)
                try:
                    self.pacer.repace()
                except OSError:
                    log.debug("release of paced sockets failed", exc_info=True)
        if self.queues is not None:
            try:
                self.queues.close()
            except Exception:
                log.exception("removing the download queues failed")
            self.queues = None
        if self.kernel:
            kernel, self.kernel = self.kernel, None
            kernel.close()

    pacer: Pacer | None = None
    budgets: Budgets | None = None

    def __enter__(self) -> Engine:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _need(self) -> Kernel:
        if not self.kernel:
            raise RuntimeError("engine is not open")
        return self.kernel

    def program_fd(self, name: str) -> int:
        return self._need().obj.program_fd(name)

    def map_fd(self, name: str) -> int:
        """File descriptor of one of the object's maps (for inspection and tests)."""
        return self._need().fd(name)

    def global_counters(self) -> abi.Global:
        return self._need().global_counters()

    @property
    def attached_cgroups(self) -> list[str]:
        return self.attachments.attached if self.kernel else []

    def attach_root(self) -> None:
        """Cover every cgroup (rules must see processes wherever they start)."""
        self.attachments.ensure("")

    # ---- per-process limits ------------------------------------------------------------------
    @staticmethod
    def _check_target(pid: int) -> None:
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise NoSuchProcess(f"no process {pid!r}")
        procfs.check_process(pid)
        if pid == 1:
            raise InvalidLimit("pid 1 cannot be limited: it would limit the whole system")
        if pid == os.getpid():
            raise InvalidLimit("the daemon cannot limit itself")

    def set_limit(self, pid: int, download: int, upload: int, *,
                  burst_download: int | None = None, burst_upload: int | None = None,
                  process: procfs.Process | None = None, owner_uid: int = 0,
                  start_time: int | None = None) -> Limit | None:
        """Limit pid and its descendants as one budget; again changes it; 0/0 removes it
        (returns None then).  process: the caller's handle of pid (opened before it was
        authorized); start_time: refuse unless pid is still the process that started then
        (restoring a saved limit)."""
        self._need()
        check_rate(download, "download")
        check_rate(upload, "upload")
        self._check_target(pid)
        own = process is None
        proc = process or procfs.open_process(pid)
        try:
            if proc.pid != pid or not proc.alive():
                raise NoSuchProcess(f"process {pid} has exited")
            if start_time is not None and proc.start_time != start_time:
                raise NoSuchProcess(f"process {pid} is not the process the limit was set on")
            existing = self._root_budget(pid, proc)
            if download == 0 and upload == 0:
                if existing is not None:
                    self._clear(existing, pid)
                return None
            if existing is not None and existing.origin == ORIGIN_EXPLICIT:
                if len(existing.roots) == 1:
                    self.budgets.change(existing, download, upload,
                                        burst_download=burst_download, burst_upload=burst_upload)
                    existing.owner_uid = owner_uid
                    log.info("PID %d: limit changed to download=%d B/s upload=%d B/s", pid,
                             download, upload)
                    return self._limit(existing, pid)
            return self._create(proc, download, upload, burst_download, burst_upload, owner_uid)
        finally:
            if own:
                proc.close()

    def _root_budget(self, pid: int, proc: procfs.Process) -> Budget | None:
        bid = self.budgets.by_root.get(pid)
        b = self.budgets.by_bid.get(bid) if bid is not None else None
        if b is not None and b.roots.get(pid) != proc.start_time:
            # the pid was reused: that limit ended with its process
            self.budgets.drop_root(b, pid)
            return None
        return b

    def _create(self, proc: procfs.Process, download: int, upload: int,
                burst_download: int | None, burst_upload: int | None, owner_uid: int) -> Limit:
        b = self.budgets.create(download, upload, burst_download=burst_download,
                                burst_upload=burst_upload, owner_uid=owner_uid,
                                root_tgid=proc.pid)
        try:
            members = self.budgets.enroll(b, proc)
        except BaseException:
            self.budgets.delete(b, repace=False)
            raise
        old = self.budgets.by_root.get(proc.pid)
        if old is not None and old in self.budgets.by_bid:
            self.budgets.drop_root(self.budgets.by_bid[old], proc.pid)
        self.budgets.add_root(b, proc)
        log.info("PID %d (%s): limit download=%d B/s upload=%d B/s (budget %d, %d process(es),"
                 " burst %d/%d)", proc.pid, safe(procfs.comm(proc.pid)), download, upload, b.bid,
                 len(members), b.burst_download, b.burst_upload)
        return self._limit(b, proc.pid)

    @staticmethod
    def _limit(b: Budget, pid: int) -> Limit:
        return Limit(pid, b.download, b.upload, b.burst_download, b.burst_upload, b.origin,
                     b.rule, b.owner_uid, b.roots.get(pid, 0), b.bid)

    def clear_limit(self, pid: int) -> None:
        self._need()
        bid = self.budgets.by_root.get(pid) if isinstance(pid, int) else None
        b = self.budgets.by_bid.get(bid) if bid is not None else None
        if b is None:
            raise NoSuchLimit(f"process {pid} has no limit")
        self._clear(b, pid)

    def _clear(self, b: Budget, pid: int) -> None:
        if b.persistent or len(b.roots) > 1:
            # one process of a shared (application) budget: it leaves, the budget stays
            self.budgets.drop_root(b, pid)
            try:
                with procfs.open_process(pid) as proc:
                    self.budgets.release(b, proc)
            except NoSuchProcess:
                pass
        else:
            self.budgets.delete(b)
        log.info("PID %d: limit cleared", pid)

    def list_limits(self) -> list[Limit]:
        out = []
        for pid, bid in self.budgets.by_root.items():
            b = self.budgets.by_bid.get(bid)
            if b is not None:
                out.append(self._limit(b, pid))
        return sorted(out, key=lambda lim: lim.pid)

    def limit_rows(self) -> list[tuple[int, int, int]]:
        """(pid, download, upload) of every limit, by pid: ListLimits and the Limits
        property.  Kept until something changes (10,000 limits are listed for free)."""
        if self._rows_gen != self.budgets.gen:
            rows = []
            for pid, bid in self.budgets.by_root.items():
                b = self.budgets.by_bid.get(bid)
                if b is not None:
                    rows.append((pid, b.download, b.upload))
            rows.sort()
            self._rows, self._rows_gen = rows, self.budgets.gen
        return self._rows

    _rows: list = []
    _rows_gen = -1

    def limit_count(self) -> int:
        """How many limits are listed (what limit_rows() would return), in O(1)."""
        return len(self.budgets.by_root) if self.budgets is not None else 0

    def limit_of(self, pid: int) -> Limit | None:
        """The limit whose root pid is `pid` (who set it, which rule), or None."""
        bid = self.budgets.by_root.get(pid)
        b = self.budgets.by_bid.get(bid) if bid is not None else None
        return self._limit(b, pid) if b is not None else None

    def members(self, pid: int) -> list[int]:
        """Processes currently in pid's budget (the kernel's view)."""
        bid = self.budgets.by_root.get(pid)
        if bid is None:
            raise NoSuchLimit(f"process {pid} has no limit")
        return self.budgets.members(bid)

    # ---- unit limits ---------------------------------------------------------------------
    def set_unit_limit(self, unit_or_cgroup: str, download: int, upload: int) -> UnitLimit | None:
        self._need()
        return self.units.set(unit_or_cgroup, download, upload)

    def clear_unit_limit(self, unit_or_cgroup: str) -> None:
        self._need()
        self.units.clear(unit_or_cgroup)

    def list_unit_limits(self) -> list[UnitLimit]:
        return self.units.list() if self.kernel else []

    # ---- rules (mechanism: budgets and the exec matcher; the daemon decides) -------------
    def rule_budget(self, rule_id: str, download: int, upload: int) -> Budget:
        """The shared budget of a scope=application rule (lives with no member)."""
        self._need()
        return self.budgets.create(download, upload, origin=ORIGIN_RULE, rule=rule_id,
                                   persistent=True)

    def rule_limit(self, proc: procfs.Process, rule_id: str, download: int, upload: int, *,
                   budget: Budget | None = None, slot: int = 0) -> Limit:
        """Limit a running process for a rule: in the rule's shared budget, or in a budget
        of its own.  An explicit limit is never replaced (NoSuchProcess if it exited)."""
        self._need()
        current = self.budgets.budget_of(proc)
        if current is not None and current[1] & abi.TASK_EXPLICIT:
            raise InvalidLimit(f"process {proc.pid} has an explicit limit, which wins")
        b = budget or self.budgets.create(download, upload, origin=ORIGIN_RULE, rule=rule_id,
                                          root_tgid=proc.pid)
        try:
            self.budgets.enroll(b, proc, rule_slot=slot)
        except BaseException:
            if budget is None:
                self.budgets.delete(b, repace=False)
            raise
        old = self.budgets.by_root.get(proc.pid)
        if old is not None and old in self.budgets.by_bid and old != b.bid:
            ob = self.budgets.by_bid[old]
            self.budgets.drop_root(ob, proc.pid)
            if not ob.roots and not ob.persistent:
                self.budgets.delete(ob)
        self.budgets.add_root(b, proc)
        return self._limit(b, proc.pid)

    def rule_budgets(self, rule_id: str) -> list[Budget]:
        return [b for b in self.budgets.by_bid.values()
                if b.origin == ORIGIN_RULE and b.rule == rule_id]

    def change_rule(self, rule_id: str, download: int, upload: int) -> None:
        """New rates for every budget of a rule, without a gap."""
        for b in self.rule_budgets(rule_id):
            self.budgets.change(b, download, upload)

    def drop_rule(self, rule_id: str) -> list[int]:
        """Free every process a rule limits, at once; returns their root pids."""
        pids = []
        for b in self.rule_budgets(rule_id):
            pids += list(b.roots)
            self.budgets.delete(b, repace=False)
        self.pacer.repace()
        return pids

    def load_exec_rules(self, rules: list[KernelRule]) -> None:
        self._need()
        self.matcher.load(rules)

    # ---- events --------------------------------------------------------------------------
    @property
    def events_fd(self) -> int:
        return self._need().events_fd

    def handle_events(self) -> list[Notice]:
        """Take the kernel's events, act on those that are mechanism, return the rest."""
        out: list[Notice] = []
        repace = False
        for ev in self._need().take_events():
            try:
                repace |= self._event(ev, out)
            except Exception:  # one bad event must not stop the others
                log.exception("event %d failed", ev.type)
        if repace:
            self.pacer.repace()
        return out

    def _event(self, ev: abi.Event, out: list[Notice]) -> bool:
        t = ev.type
        if t == abi.EV_EMPTY:
            b = self.budgets.by_bid.get(ev.budget)
            if b is None:
                if ev.budget >= abi.KERNEL_BID:  # a rule budget the kernel made and dropped
                    self.budgets.forget_kernel_budget(ev.budget)
                return False
            if b.persistent:
                for pid in list(b.roots):
                    self.budgets.drop_root(b, pid)
                    out.append(Notice(NOTICE_EXITED, pid, rule=b.rule))
                return False
            for pid in list(b.roots):
                out.append(Notice(NOTICE_EXITED, pid, rule=b.rule))
                log.info("PID %d exited: limit removed", pid)
            self.budgets.delete(b)
        elif t == abi.EV_ROOT_EXIT:
            self._root_exited(ev, out)
        elif t == abi.EV_RULE:
            kr = self.matcher.rule_of_slot(ev.rule)
            if kr is None:
                return False
            if kr.application:
                b = self.budgets.by_bid.get(ev.budget)
            else:
                b = self.budgets.adopt(ev.budget, rule=kr.rule_id, download=kr.download,
                                       upload=kr.upload, burst_download=kr.burst_download,
                                       burst_upload=kr.burst_upload)
            if b is not None:
                try:
                    with procfs.open_process(ev.tgid) as proc:
                        self.budgets.add_root(b, proc)
                        self.attachments.ensure_for_pid(proc.pid)
                    out.append(Notice(NOTICE_RULE, ev.tgid, rule=kr.rule_id))
                except NoSuchProcess:
                    # it exited before this event was read (a launcher): the limit is on
                    # what it started, listed as the oldest of those
                    if not b.roots:
                        heir = self._heir(b)
                        if heir is not None:
                            out.append(Notice(NOTICE_RULE, heir, other=ev.tgid,
                                              rule=kr.rule_id))
        elif t == abi.EV_EXEC:
            out.append(Notice(NOTICE_EXEC, ev.tgid, other=ev.rule))
        elif t == abi.EV_CLASS:
            self.on_class_needed(ev.budget, unit=bool(ev.a))
        elif t == abi.EV_DEVICE:
            if self.queues is not None:
                try:
                    self.queues.device_needed(int(ev.a))
                except Exception:
                    log.exception("cannot add a download queue on device %d", ev.a)
        elif t == abi.EV_CGROUP_RMDIR:
            self.attachments.on_rmdir(ev.a)
            self.units.on_rmdir(ev.a)
        elif t == abi.EV_CGROUP_MKDIR:
            self.attachments.on_mkdir(ev.a, ev.b)
            self.units.on_mkdir(ev.a, ev.b)
        elif t == abi.EV_CGROUP_MOVE:
            try:
                self.attachments.ensure_for_pid(ev.tgid)
            except (NoSuchProcess, Unsupported):
                pass
        elif t in (abi.EV_RETAG, abi.EV_PEER):
            return True
        elif t == abi.EV_FULL:
            which = {abi.FULL_LIMITS: "limits", abi.FULL_TASKS: "process storage",
                     abi.FULL_PEERS: "paced connections",
                     abi.FULL_TRAFFIC: "traffic"}.get(int(ev.a), str(ev.a))
            kr = self.matcher.rule_of_slot(ev.rule) if ev.rule else None
            out.append(Notice(NOTICE_FULL, ev.tgid, rule=kr.rule_id if kr else "",
                              detail=which))
        return False

    def on_class_needed(self, key: int, unit: bool) -> None:
        """A remote download of a limit arrived with no queue for it yet."""
        if self.queues is None:
            return
        if unit:
            rate = next((u.download for u in self.units.list() if u.cgroup_id == key), 0)
        else:
            b = self.budgets.by_bid.get(key)
            rate = b.download if b is not None else 0
        try:
            self.queues.class_needed(key, unit, rate)
        except Exception:
            log.exception("cannot add a download queue for limit %d", key)

    def _root_exited(self, ev: abi.Event, out: list[Notice]) -> None:
        b = self.budgets.by_bid.get(ev.budget)
        if b is None or ev.tgid not in b.roots:
            return
        self.budgets.drop_root(b, ev.tgid)
        if b.roots:  # other roots keep it listed (an application budget)
            out.append(Notice(NOTICE_EXITED, ev.tgid, rule=b.rule))
            return
        pid = self._heir(b)
        if pid is not None:
            log.info("PID %d exited; its limit stays on its descendants, now listed as PID %d",
                     ev.tgid, pid)
            out.append(Notice(NOTICE_MOVED, ev.tgid, other=pid, rule=b.rule))
            return
        out.append(Notice(NOTICE_EXITED, ev.tgid, rule=b.rule))

    def _heir(self, b: Budget) -> int | None:
        """The limit of a budget whose listed process is gone moves to its oldest surviving
        member (the kernel's census), which becomes its root; its pid, or None."""
        heirs = []
        for r in self.budgets.census(b.bid):
            try:
                heirs.append((procfs.start_time(r.tgid), r.tgid))
            except NoSuchProcess:
                continue
        for _, pid in sorted(heirs):
            try:
                with procfs.open_process(pid) as proc:
                    self.budgets.mark_root(b, proc)
                    self.budgets.add_root(b, proc)
                    self.attachments.ensure_for_pid(proc.pid)
            except NoSuchProcess:
                continue
            return pid
        return None

    # ---- statistics ----------------------------------------------------------------------
    def sample(self, *, traffic: bool = False) -> None:
        self._need()
        self.sampler.sample(traffic=traffic)

    def housekeeping(self) -> None:
        """What may wait a few seconds (the daemon calls it every few): the socket-use
        tracepoints detached once no budget has existed for a while."""
        self._need()
        self.attachments.expire()

    def stats(self, pid: int) -> ProcessStats:
        """Statistics of any process, limited or not."""
        self._need()
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise NoSuchProcess(f"no process {pid!r}")
        procfs.check_process(pid)
        with procfs.open_process(pid) as proc:
            return self._stats(proc)

    def _stats(self, proc: procfs.Process) -> ProcessStats:
        pid = proc.pid
        assert self.cg
        rel = self.cg.of_pid(pid)
        who = dict(comm=procfs.comm(pid), cgroup=cgroups.display(rel), exe=procfs.exe(pid),
                   uid=_uid(pid), unit=cgroups.unit_of(rel))
        found = self.budgets.budget_of(proc)
        b = self.budgets.by_bid.get(found[0]) if found else None
        if b is not None:
            cur = self.budgets.read(b.bid) or abi.Limit()
            w = self.sampler.window(b.bid)
            sock = self.sampler.socket_rate.get(b.bid, (0.0, 0.0))
            wins = [verdict.Window(lim, w.rate[d], w.calls[d], w.dropped[d], sock[d])
                    for d, lim in ((abi.DIR_DOWNLOAD, b.download), (abi.DIR_UPLOAD, b.upload))]
            status = verdict.worst([verdict.classify(x) for x in wins])
            dn, up = cur.dir[abi.DIR_DOWNLOAD], cur.dir[abi.DIR_UPLOAD]
            root = next(iter(b.roots), 0)
            queued, qdrops = self.queues.stats(b.bid) if self.queues is not None else (0, 0)
            return ProcessStats(
                pid=pid, download_limit=b.download, upload_limit=b.upload,
                download_rate=wins[0].rate, upload_rate=wins[1].rate,
                download_bytes=dn.passed_bytes, upload_bytes=up.passed_bytes,
                download_packets=dn.passed_packets, upload_packets=up.passed_packets,
                download_dropped=dn.dropped_packets, upload_dropped=up.dropped_packets,
                download_dropped_bytes=dn.dropped_bytes, upload_dropped_bytes=up.dropped_bytes,
                program_calls=dn.calls + up.calls, status=status,
                download_calls=dn.calls, upload_calls=up.calls,
                download_socket_rate=sock[0], upload_socket_rate=sock[1],
                download_sockets=w.sockets[0], upload_sockets=w.sockets[1],
                download_queued=queued, download_queue_dropped=qdrops,
                rule=b.rule, budget_pid=pid if pid in b.roots else root, **who)
        t = self.sampler.traffic_of(pid)
        rd = ru = 0.0
        tw = self.sampler.traffic_window()
        if tw and pid in tw[2]:
            dt, a, z = tw
            a0 = a.get(pid, (0, 0, 0, 0))
            rd, ru = (z[pid][0] - a0[0]) / dt, (z[pid][1] - a0[1]) / dt
        return ProcessStats(
            pid=pid, download_limit=0, upload_limit=0, download_rate=rd, upload_rate=ru,
            download_bytes=t[0], upload_bytes=t[1], download_packets=t[2], upload_packets=t[3],
            download_dropped=0, upload_dropped=0, download_dropped_bytes=0,
            upload_dropped_bytes=0, program_calls=t[2] + t[3],
            status=names.STATUS_UNLIMITED, download_calls=t[2], upload_calls=t[3], **who)

    def active_limits(self) -> list[int]:
        """Root pids of limits whose program saw packets in the last window, or whose
        sockets moved bytes the program did not see.  Cheap: no /proc."""
        active = self.sampler.active_budgets() | {
            bid for bid, r in self.sampler.socket_rate.items() if any(r)}
        return sorted(pid for pid, bid in self.budgets.by_root.items() if bid in active)

    def list_processes(self) -> list[ProcessStats]:
        """Stats of every process that moved bytes in the last window, busiest first."""
        self._need()
        import time

        now = time.monotonic()
        if self.sampler.want_traffic_until < now:  # nobody asked lately: start sampling
            self.sampler.want_traffic_until = now + TRAFFIC_LINGER
            self.sampler.sample(traffic=True)
        self.sampler.want_traffic_until = now + TRAFFIC_LINGER
        moved: set[int] = set()
        tw = self.sampler.traffic_window()
        if tw:
            _, a, z = tw
            moved = {pid for pid, c in z.items() if c[:2] != a.get(pid, (0, 0, 0, 0))[:2]}
        active = self.sampler.active_budgets()
        moved |= {pid for pid, bid in self.budgets.by_root.items() if bid in active}
        out = []
        for pid in moved:
            try:
                with procfs.open_process(pid) as proc:
                    out.append(self._stats(proc))
            except (NoSuchProcess, Unsupported):
                continue
        out.sort(key=lambda s: s.download_rate + s.upload_rate, reverse=True)
        return out


def _uid(pid: int) -> int | None:
    try:
        return procfs.uid(pid)
    except NoSuchProcess:
        return None


RATE_WINDOW_SECONDS = RATE_WINDOW
