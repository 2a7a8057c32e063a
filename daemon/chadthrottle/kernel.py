"""The loaded BPF object as the engine's parts use it: map fds by name, the runtime
configuration (the daemon is its only writer), the iterators that act inside the kernel,
and the event ring buffer.

Ownership rule: everything here is driven from the daemon's one event-loop thread; nothing
is thread-safe and nothing needs to be.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from . import abi, libbpf, names
from .bpfobject import BpfObject, RingBuffer

log = logging.getLogger(__name__)

MAPS = (
    names.MAP_SK_TAG, names.MAP_TASK_BUDGET, names.MAP_LIMITS, names.MAP_LIMIT_CFG,
    names.MAP_UNIT_LIMITS, names.MAP_UNIT_CFG, names.MAP_PROC_TRAFFIC, names.MAP_PEER_PACE,
    names.MAP_DL_CLASS, names.MAP_DL_DEVICES, names.MAP_RULES, names.MAP_EXE_RULES,
    names.MAP_EXE_DIRS, names.MAP_WATCH_CGROUPS, names.MAP_ACTIVE, names.MAP_CHECKS,
    names.MAP_FILE_SOCKS, names.MAP_CONFIG, names.MAP_GLOBAL_STATS, names.MAP_KERNEL_BIDS,
    names.MAP_EVENTS,
)


def _trim_heap() -> None:
    """Give back to the system the heap libbpf used while loading (the kernel's BTF it
    parsed for CO-RE relocations is freed, but glibc keeps the pages)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Kernel:
    def __init__(self, path: str | Path | None = None, *, max_limits: int | None = None) -> None:
        """max_limits: room for that many budgets (the limits and limit_cfg maps) instead of
        abi.MAX_LIMITS."""
        sizes = {names.MAP_LIMITS: max_limits, names.MAP_LIMIT_CFG: max_limits} \
            if max_limits else {}
        self.obj = BpfObject(path, map_sizes=sizes)
        self.max_limits = max_limits or abi.MAX_LIMITS
        self.fds: dict[str, int] = {}
        self.config = abi.Config()
        self.pid_level = 0
        self.cgroup_level = 0
        self._ring: RingBuffer | None = None
        self._pending: list[abi.Event] = []

    @property
    def path(self) -> Path:
        return self.obj.path

    def load(self) -> None:
        self.obj.load()
        self.max_limits = self.obj.max_entries(names.MAP_LIMITS)
        for m in MAPS:
            self.fds[m] = self.obj.map_fd(m)
        self.config.daemon_tgid = os.getpid()
        self.write_config()
        self.pid_level, self.cgroup_level = self._where_am_i()
        self.config.pid_level = self.pid_level
        self.write_config()
        self._ring = self.obj.ring_buffer(names.MAP_EVENTS, self._on_event)
        _trim_heap()

    def _where_am_i(self) -> tuple[int, int]:
        """The levels of the daemon's pid namespace and of its cgroup namespace's root, as
        the kernel counts them.  In a container both are above 0: pids the kernel reports
        are then translated to the daemon's namespace, and cgroup levels are counted from
        the real root."""
        fd = os.pidfd_open(os.getpid())
        try:
            raw = self.iterate(names.PROG_ITER_TASK, abi.ITER_SELF, pid_fd=fd)
        finally:
            os.close(fd)
        if len(raw) < ctypes.sizeof(abi.SelfRec):
            return 0, 0
        rec = abi.SelfRec.from_buffer_copy(raw)
        if rec.pid_level or rec.cgroup_level:
            log.info("in a container: pid namespace level %d, cgroup namespace root at "
                     "level %d", rec.pid_level, rec.cgroup_level)
        return rec.pid_level, rec.cgroup_level

    def close(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self.obj.close()
        self.fds.clear()

    def fd(self, name: str) -> int:
        return self.fds[name]

    # -- configuration -----------------------------------------------------------------------
    def write_config(self) -> None:
        libbpf.map_update(self.fds[names.MAP_CONFIG], ctypes.c_uint32(0), self.config)

    def bump_cfg_gen(self) -> None:
        """limit_cfg or unit_cfg changed: every limit copies its settings in on its next
        packet."""
        self.config.cfg_gen += 1
        self.write_config()

    def set_flag(self, flag: int, on: bool) -> None:
        want = (self.config.flags | flag) if on else (self.config.flags & ~flag)
        if want != self.config.flags:
            self.config.flags = want
            self.write_config()

    # -- iterators ---------------------------------------------------------------------------
    def iterate(self, program: str, op: int, *, budget: int = 0, tgid: int = 0, arg: int = 0,
                pid_fd: int | None = None) -> bytes:
        """Run an iterator program with its arguments in the configuration."""
        c = self.config
        c.iter_op, c.iter_budget, c.iter_tgid, c.iter_arg = op, budget, tgid, arg
        self.write_config()
        return self.obj.run_iter(program, pid_fd)

    def tag_sockets(self, op: int, *, budget: int = 0, tgid: int = 0,
                    pid_fds: Sequence[int | None] = (None,)) -> bytes:
        """Tag the sockets in the files of processes (each pidfd; None: every process):
        ITER_TAG by the membership of their process (sockets of a process that left
        ``budget`` leave it too), ITER_UNIT those in the cgroup ``budget`` at level ``tgid``.

        Two passes: iter/task_file finds the sockets and records what each becomes by its
        inode number (file_socks), iter/tcp and iter/udp tag them (only they hand the kernel
        a socket its storage accepts).  The socket iterators see the daemon's network
        namespace; a socket of another one is charged on its next send or receive instead.
        A socket pass runs only for a protocol the first pass found: even empty, it walks
        every bucket of that protocol's hash table (milliseconds on a large machine).
        Returns the id of each budget a socket joined (8 bytes each)."""
        found = b""
        for fd in pid_fds:  # the protocol of each socket recorded (a u32 each)
            found += self.iterate(names.PROG_ITER_FILES, op, budget=budget, tgid=tgid, pid_fd=fd)
        if not found:
            return b""
        protos = set(memoryview(found).cast("I"))
        out = b""
        for proto, program in ((socket.IPPROTO_TCP, names.PROG_ITER_TCP_FILES),
                               (socket.IPPROTO_UDP, names.PROG_ITER_UDP_FILES)):
            if proto in protos:
                out += self.iterate(program, abi.ITER_SOCKS, budget=budget)
        fd = self.fds[names.MAP_FILE_SOCKS]
        for key in libbpf.map_keys(fd, ctypes.c_uint64):  # other namespaces' sockets
            libbpf.map_delete(fd, ctypes.c_uint64(key))
        return out

    # -- events ------------------------------------------------------------------------------
    @property
    def events_fd(self) -> int:
        assert self._ring is not None
        return self._ring.fd

    def _on_event(self, data: bytes) -> None:
        if len(data) >= ctypes.sizeof(abi.Event):
            self._pending.append(abi.Event.from_buffer_copy(data))

    def take_events(self) -> list[abi.Event]:
        """Every event the kernel reported since the last call."""
        if self._ring is not None:
            self._ring.consume()
        out, self._pending = self._pending, []
        return out

    # -- counters ----------------------------------------------------------------------------
    def global_counters(self) -> abi.Global:
        """Whole-program counters summed over CPUs."""
        arr = (abi.Global * libbpf.num_possible_cpus())()
        libbpf.check(libbpf.lib().bpf_map_lookup_elem(
            self.fds[names.MAP_GLOBAL_STATS], ctypes.byref(ctypes.c_uint32(0)),
            ctypes.byref(arr)), "global stats")
        total = abi.Global()
        for g in arr:
            for name, ctype in abi.Global._fields_:
                if hasattr(ctype, "_length_"):
                    for d in range(ctype._length_):
                        getattr(total, name)[d] += getattr(g, name)[d]
                else:
                    setattr(total, name, getattr(total, name) + getattr(g, name))
        return total

    def task_of(self, pidfd: int) -> abi.Task | None:
        """The task-local storage of a process (by pidfd), or None."""
        v = abi.Task()
        if libbpf.map_lookup(self.fds[names.MAP_TASK_BUDGET], ctypes.c_int(pidfd), v):
            return v
        return None
