"""Where the programs are attached.

* The packet and socket-creation programs (sock_create, cgroup_skb ingress/egress) attach
  once per *stable parent* cgroup of a limited process (see cgroups.stable_parent), as a set:
  never an ancestor and a descendant at once, so a packet is counted and charged once
  (cgroups.plan_attach).  With rules, or ``--monitor-all``, they attach at the cgroup2 root:
  a rule must see processes wherever they start.
* The per-connection programs (sock_ops, cgroup/setsockopt) attach once at the root: they
  run on connection events and setsockopt calls only, and must see the local sender of a
  limited connection wherever it lives.
* The tracing programs (fork, exit, exec, socket use, cgroup events) attach once.

Every attachment is a bpf_link owned by the daemon: if it dies, the kernel removes them and
traffic flows unlimited (fail-open).  A cgroup that is removed takes its attachment with
it; the kernel reports the removal, the parent is watched, and the attachment is made again
when a cgroup of the same path appears (``systemctl restart`` of a service does this).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from . import cgroups, cgwatch, names
from .bpfobject import Link
from .errors import NoSuchProcess, Unsupported

log = logging.getLogger("chadthrottle.attach")

DATA_PROGRAMS = (names.PROG_SOCK_CREATE, names.PROG_SOCK_RELEASE, names.PROG_INGRESS,
                 names.PROG_EGRESS)
CONTROL_PROGRAMS = (names.PROG_SOCKOPS, names.PROG_SETSOCKOPT)
TRACING_PROGRAMS = (names.PROG_FORK, names.PROG_EXIT, names.PROG_EXEC, names.PROG_CGROUP_ATTACH,
                    names.PROG_CGROUP_MKDIR, names.PROG_CGROUP_RMDIR)
#: every send and receive system call of the machine runs these: attached only while some
#: budget exists (a limited process using a socket it did not create is charged for it)
SOCKET_USE_PROGRAMS = (names.PROG_SOCK_SEND, names.PROG_SOCK_RECV)
#: after the last budget goes they stay this long (seconds): a storm of short processes
#: limited by a rule makes and ends a budget each, and attaching costs ~6 ms a time (their
#: programs return at once while no budget exists: CT_CFG_BUDGETS is clear)
SOCKET_USE_LINGER = 10.0
OWNER = "attach"


@dataclass
class _Attached:
    rel: str
    cgid: int
    links: list[Link] = field(default_factory=list)


class Attachments:
    def __init__(self, kernel, cg: cgroups.Cgroups, watches: cgwatch.Watches) -> None:
        self._kernel = kernel
        self._cg = cg
        self._watches = watches
        self._attached: dict[str, _Attached] = {}
        self._lost: set[str] = set()  # attached parents whose cgroup was removed
        self._socket_use: list[Link] = []
        self._unwatch_at: float | None = None

    def open(self, *, monitor_root: bool = False) -> None:
        obj = self._kernel.obj
        for p in TRACING_PROGRAMS:
            obj.attach_tracing(p)
        root = str(self._cg.root)
        for p in CONTROL_PROGRAMS:
            obj.attach_cgroup(p, root)
        if monitor_root:
            self.ensure("")

    def watch_socket_use(self, on: bool) -> None:
        """Attach the send/receive tracepoints (on), or let them go SOCKET_USE_LINGER
        seconds from now (off; :meth:`expire` detaches them when that time has come)."""
        if on:
            self._unwatch_at = None
            if not self._socket_use:
                obj = self._kernel.obj
                self._socket_use = [obj.attach_tracing(p) for p in SOCKET_USE_PROGRAMS]
        elif self._socket_use and self._unwatch_at is None:
            self._unwatch_at = time.monotonic() + SOCKET_USE_LINGER

    def expire(self, now: float | None = None) -> None:
        """Detach the send/receive tracepoints if they were let go long enough ago."""
        if self._unwatch_at is None or (now or time.monotonic()) < self._unwatch_at:
            return
        self._unwatch_at = None
        for link in self._socket_use:
            self._kernel.obj.detach(link)
        self._socket_use = []

    @property
    def watching_socket_use(self) -> bool:
        return bool(self._socket_use)

    @property
    def attached(self) -> list[str]:
        return sorted(cgroups.display(p) for p in self._attached)

    def covers(self, rel: str) -> bool:
        return any(cgroups.is_ancestor_or_self(a, rel) for a in self._attached)

    def ensure(self, rel_parent: str) -> bool:
        """Attach the packet programs so that `rel_parent` is covered exactly once; True if
        something was attached."""
        target, obsolete = cgroups.plan_attach(self._attached, rel_parent)
        if target is None:
            return False
        path = self._cg.abspath(target)
        log.info("Attaching eBPF programs to parent cgroup (path: %s)", path)
        obj = self._kernel.obj
        links: list[Link] = []
        try:
            for prog in DATA_PROGRAMS:
                links.append(obj.attach_cgroup(prog, path))
            cgid = self._cg.cgroup_id(target)
        except OSError as exc:
            for link in reversed(links):
                obj.detach(link)
            raise Unsupported(f"cannot attach to cgroup {path}: {exc}") from exc
        entry = _Attached(target, cgid, links)
        self._attached[target] = entry
        self._lost.discard(target)
        self._watch(entry)
        log.info("Successfully attached eBPF programs to %s", cgroups.display(target))
        for d in obsolete:  # now covered by the new ancestor attachment
            self._drop(d)
            log.info("Detached from %s (covered by %s)", cgroups.display(d),
                     cgroups.display(target))
        return True

    def ensure_for_cgroup(self, rel: str, why: str = "") -> bool:
        parent = cgroups.stable_parent(rel)
        if why:
            log.debug("%s cgroup: %s -> attaching to parent: %s", why,
                      cgroups.display(rel), cgroups.display(parent))
        return self.ensure(parent)

    def ensure_for_pid(self, pid: int) -> str:
        """Cover the process's cgroup; its cgroup path."""
        rel = self._cg.of_pid(pid)
        self.ensure_for_cgroup(rel, f"PID {pid}")
        return rel

    def _watch(self, entry: _Attached) -> None:
        self._watches.add(entry.cgid, cgwatch.RMDIR, OWNER + entry.rel)
        if entry.rel:
            parent = entry.rel.rsplit("/", 1)[0] if "/" in entry.rel else ""
            try:
                self._watches.add(self._cg.cgroup_id(parent), cgwatch.MKDIR, OWNER + entry.rel)
            except OSError:
                pass

    def _drop(self, rel: str) -> None:
        entry = self._attached.pop(rel)
        for link in reversed(entry.links):
            try:
                self._kernel.obj.detach(link)
            except OSError:  # the cgroup is gone and took the attachment with it
                log.debug("detach from removed %s", rel, exc_info=True)
        self._watches.discard(entry.cgid, cgwatch.RMDIR, OWNER + rel)

    # -- cgroup events -------------------------------------------------------------------
    def on_rmdir(self, cgid: int) -> bool:
        for rel, entry in list(self._attached.items()):
            if entry.cgid == cgid:
                log.warning("cgroup %s was removed: its programs went with it; they are "
                            "attached again when it comes back", cgroups.display(rel))
                self._drop(rel)
                self._lost.add(rel)
                return True
        return False

    def on_mkdir(self, cgid: int, parent_cgid: int) -> bool:
        for rel in list(self._lost):
            parent = rel.rsplit("/", 1)[0] if "/" in rel else ""
            try:
                if self._cg.cgroup_id(rel) != cgid or self._cg.cgroup_id(parent) != parent_cgid:
                    continue
            except OSError:
                continue
            log.info("cgroup %s is back", cgroups.display(rel))
            try:
                return self.ensure(rel)
            except (Unsupported, NoSuchProcess):
                log.warning("cannot attach to %s again", cgroups.display(rel), exc_info=True)
        return False
