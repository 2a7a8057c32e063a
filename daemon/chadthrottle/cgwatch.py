"""Which cgroups the kernel reports creation and removal events for (map watch_cgroups).

Several parts watch the same cgroup (the attached parents, unit limits); the map holds the
union of their bits and a bit is cleared when its last watcher goes.
"""

from __future__ import annotations

import ctypes
from collections import defaultdict

from . import libbpf, names

RMDIR = 1  # report the cgroup's removal
MKDIR = 2  # report cgroups created directly below it


class Watches:
    def __init__(self, kernel) -> None:
        self._fd = kernel.fd(names.MAP_WATCH_CGROUPS)
        self._owners: dict[tuple[int, int], set[str]] = defaultdict(set)

    def _bits(self, cgid: int) -> int:
        return sum(bit for bit in (RMDIR, MKDIR) if self._owners.get((cgid, bit)))

    def _write(self, cgid: int) -> None:
        bits = self._bits(cgid)
        if bits:
            libbpf.map_update(self._fd, ctypes.c_uint64(cgid), ctypes.c_uint8(bits))
        else:
            libbpf.map_delete(self._fd, ctypes.c_uint64(cgid))

    def add(self, cgid: int, bit: int, owner: str) -> None:
        key = (cgid, bit)
        if owner not in self._owners[key]:
            self._owners[key].add(owner)
            self._write(cgid)

    def discard(self, cgid: int, bit: int, owner: str) -> None:
        key = (cgid, bit)
        owners = self._owners.get(key)
        if owners and owner in owners:
            owners.discard(owner)
            if not owners:
                del self._owners[key]
            self._write(cgid)

    def watched(self, cgid: int, bit: int) -> bool:
        return bool(self._owners.get((cgid, bit)))
