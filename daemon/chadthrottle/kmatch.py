"""The exec matcher: rules decided in the kernel, before a new program runs.

At every exec the kernel tries the rule slots in order (the rules' precedence) against the
executable's inode, the real uid, the process name and the cgroup; the first match enrolls
the process — in the rule's shared budget (scope=application) or in a budget of its own
made on the spot (scope=process) — before the program's first instruction, so its first
packet is limited.  An explicit SetLimit wins: a process in an explicit budget is never
moved by a rule.

What the kernel cannot decide is reported to the daemon (an event per exec) and decided in
user space: command-line rules, and a file the kernel does not know in a directory an exe
rule watches (a binary replaced by a package upgrade, a new file under a glob) — the daemon
also re-reads the inodes when such a directory changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass, field

from . import abi, libbpf, names
from .shaping.pacing import slack_for

log = logging.getLogger("chadthrottle.kmatch")


def kernel_dev(st_dev: int) -> int:
    """The kernel's internal dev_t (i_sb->s_dev: major << 20 | minor) of a stat st_dev."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


@dataclass(frozen=True)
class KernelRule:
    """One rule as the exec matcher sees it (the daemon translates rules to these)."""

    rule_id: str
    download: int
    upload: int
    burst_download: int
    burst_upload: int
    mss: int = 0
    application: bool = False
    app_budget: int = 0                       # scope=application: the shared budget
    exe_files: frozenset = frozenset()        # (st_dev, st_ino) of files matching `exe`
    exe_dirs: frozenset = frozenset()         # (st_dev, st_ino) of directories to watch
    has_exe: bool = False
    comm: str | None = None
    uid: int | None = None
    unit: tuple[int, int] | None = None       # (level, cgroup id)
    user_space: bool = False                  # a command-line key: decided in user space


@dataclass
class ExecMatcher:
    kernel: object
    slots: list[KernelRule] = field(default_factory=list)
    _exe_keys: set = field(default_factory=set)
    _dir_keys: set = field(default_factory=set)

    def load(self, rules: list[KernelRule]) -> None:
        """Write the slots in precedence order (the first match wins)."""
        if len(rules) > abi.MAX_RULES:
            log.warning("%d rules: the first %d are decided at exec in the kernel, the rest "
                        "when the daemon rescans", len(rules), abi.MAX_RULES)
            rules = rules[:abi.MAX_RULES]
        k = self.kernel
        fd_rules = k.fd(names.MAP_RULES)
        exe_keys: set = set()
        dir_keys: set = set()
        k.config.nrules = 0  # no exec sees a half-written table
        k.write_config()
        for slot, r in enumerate(rules):
            v = abi.Rule()
            v.flags = abi.RULE_ACTIVE
            if r.has_exe:
                v.flags |= abi.RULE_EXE
                exe_keys |= {(kernel_dev(dev), ino, slot) for dev, ino in r.exe_files}
                dir_keys |= {(kernel_dev(dev), ino) for dev, ino in r.exe_dirs}
            if r.comm is not None:
                v.flags |= abi.RULE_COMM
                v.comm = r.comm.encode()[:15]
            if r.uid is not None:
                v.flags |= abi.RULE_UID
                v.uid = r.uid
            if r.unit is not None:
                v.flags |= abi.RULE_UNIT
                v.unit_level, v.unit = r.unit
            if r.user_space:
                v.flags |= abi.RULE_USER
            if r.application:
                v.flags |= abi.RULE_APP
                v.app_budget = r.app_budget
            v.rate[abi.DIR_DOWNLOAD], v.rate[abi.DIR_UPLOAD] = r.download, r.upload
            v.burst[abi.DIR_DOWNLOAD], v.burst[abi.DIR_UPLOAD] = r.burst_download, r.burst_upload
            v.slack[abi.DIR_DOWNLOAD] = slack_for(r.download, r.mss)
            v.slack[abi.DIR_UPLOAD] = slack_for(r.upload, r.mss)
            v.mss = r.mss
            libbpf.map_update(fd_rules, ctypes.c_uint32(slot), v)
        for slot in range(len(rules), len(self.slots)):
            libbpf.map_update(fd_rules, ctypes.c_uint32(slot), abi.Rule())
        fd_exe = k.fd(names.MAP_EXE_RULES)
        for dev, ino, slot in self._exe_keys - exe_keys:
            libbpf.map_delete(fd_exe, abi.ExeKey(ino, dev, slot))
        for dev, ino, slot in exe_keys - self._exe_keys:
            libbpf.map_update(fd_exe, abi.ExeKey(ino, dev, slot), ctypes.c_uint8(1))
        fd_dirs = k.fd(names.MAP_EXE_DIRS)
        for dev, ino in self._dir_keys - dir_keys:
            libbpf.map_delete(fd_dirs, abi.DirKey(ino, dev, 0))
        for dev, ino in dir_keys - self._dir_keys:
            libbpf.map_update(fd_dirs, abi.DirKey(ino, dev, 0), ctypes.c_uint8(1))
        self._exe_keys, self._dir_keys, self.slots = exe_keys, dir_keys, list(rules)
        k.config.nrules = len(rules)
        k.set_flag(abi.CFG_EXEC_DIRS, bool(dir_keys))
        k.write_config()

    def rule_of_slot(self, slot_plus_one: int) -> KernelRule | None:
        i = slot_plus_one - 1
        return self.slots[i] if 0 <= i < len(self.slots) else None
