"""How full the BPF object's maps are: entries against max_entries, map by map.

* ``max_entries``, the type and the key and value sizes come from the kernel itself
  (``/proc/self/fdinfo/<map fd>``), read once per map.
* Hash maps (``hash``, ``lru_hash``, ``percpu_hash``, ``lru_percpu_hash``) are counted with
  ``BPF_MAP_LOOKUP_BATCH`` into one reused buffer: a few system calls per map, no Python
  object per entry.
* The ``rules`` array counts its slots in use (the daemon writes ``nrules``).
* Not counted — their ``entries`` is None: arrays of one element (``ct_config_map``,
  ``global_stats``, ``kernel_bids``: always exactly one), task and socket local storage
  (``task_budget``, ``sk_tag``: max_entries 0, they live and die with their tasks and
  sockets, and the kernel offers no count), and the ring buffer (``events``: max_entries is
  its size in bytes; a full ring shows as ``chadthrottle_bpf_events_lost_total``).

An LRU map (``proc_traffic``) is full in normal operation: it evicts its least recently
used entry instead of failing.

Called on the event loop's thread only (the map fds belong to the engine).
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Callable
from dataclasses import dataclass

from .. import libbpf
from .snapshot import MapFill

#: enum bpf_map_type (uapi/linux/bpf.h) -> the name the metrics use
MAP_TYPES = {
    1: "hash", 2: "array", 3: "prog_array", 4: "perf_event_array", 5: "percpu_hash",
    6: "percpu_array", 7: "stack_trace", 8: "cgroup_array", 9: "lru_hash",
    10: "lru_percpu_hash", 11: "lpm_trie", 12: "array_of_maps", 13: "hash_of_maps",
    14: "devmap", 15: "sockmap", 16: "cpumap", 17: "xskmap", 18: "sockhash",
    19: "cgroup_storage", 20: "reuseport_sockarray", 21: "percpu_cgroup_storage", 22: "queue",
    23: "stack", 24: "sk_storage", 25: "devmap_hash", 26: "struct_ops", 27: "ringbuf",
    28: "inode_storage", 29: "task_storage", 30: "bloom_filter", 31: "user_ringbuf",
    32: "cgrp_storage", 33: "arena",
}
HASH_TYPES = frozenset({"hash", "lru_hash", "percpu_hash", "lru_percpu_hash"})
PERCPU_TYPES = frozenset({"percpu_hash", "lru_percpu_hash", "percpu_array"})
ARRAY_TYPES = frozenset({"array", "percpu_array"})
BATCH = 1024


@dataclass(frozen=True)
class MapInfo:
    type: str
    key_size: int
    value_size: int
    max_entries: int


def map_info(fd: int) -> MapInfo:
    """The kernel's description of a map (its fdinfo)."""
    fields: dict[str, str] = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            fields[k.strip()] = v.strip()
    kind = int(fields.get("map_type", "0"))
    return MapInfo(MAP_TYPES.get(kind, f"type{kind}"), int(fields.get("key_size", "0")),
                   int(fields.get("value_size", "0")), int(fields.get("max_entries", "0")))


def count_entries(fd: int, info: MapInfo) -> int:
    """Entries of a hash map now (it may change meanwhile), by batch lookups."""
    value_size = (info.value_size + 7) // 8 * 8
    if info.type in PERCPU_TYPES:
        value_size *= libbpf.num_possible_cpus()
    chunk = max(1, min(BATCH, info.max_entries))
    token = max(16, info.key_size)
    token_in = ctypes.create_string_buffer(token)
    token_out = ctypes.create_string_buffer(token)
    opts = libbpf.BatchOpts(sz=ctypes.sizeof(libbpf.BatchOpts))
    lb = libbpf.lib()
    while True:  # a bucket larger than the batch: ENOSPC, start over with a larger one
        keys = ctypes.create_string_buffer(max(1, info.key_size) * chunk)
        values = ctypes.create_string_buffer(max(1, value_size) * chunk)
        total = 0
        first = True
        while True:
            count = ctypes.c_uint32(chunk)
            ret = lb.bpf_map_lookup_batch(fd, None if first else token_in, token_out, keys,
                                          values, ctypes.byref(count), ctypes.byref(opts))
            if ret == -errno.ENOSPC and chunk < info.max_entries:
                break
            total += count.value
            if ret == -errno.ENOENT:
                return total
            libbpf.check(ret, "map lookup batch")
            ctypes.memmove(token_in, token_out, token)
            first = False
        chunk = min(chunk * 4, info.max_entries)


class MapFills:
    """The fill of every map of the object; map types and sizes are read once."""

    def __init__(self, fds: dict[str, int], used_slots: dict[str, Callable[[], int]] | None = None):
        """fds: map name -> fd (the kernel's ``fds``); used_slots: array map name ->
        a function giving its slots in use."""
        self._fds = fds
        self._used = used_slots or {}
        self._info: dict[str, MapInfo] = {}

    def info(self, name: str) -> MapInfo:
        got = self._info.get(name)
        if got is None:
            got = self._info[name] = map_info(self._fds[name])
        return got

    def read(self) -> tuple[MapFill, ...]:
        out = []
        for name in sorted(self._fds):
            try:
                info = self.info(name)
            except (OSError, ValueError):
                continue  # closed meanwhile (the daemon is stopping)
            entries: int | None = None
            if info.type in HASH_TYPES:
                try:
                    entries = count_entries(self._fds[name], info)
                except OSError:
                    entries = None
            elif name in self._used:
                entries = int(self._used[name]())
            elif info.type in ARRAY_TYPES and info.max_entries > 1:
                entries = info.max_entries  # preallocated: every slot exists
            out.append(MapFill(name, info.type, entries, info.max_entries))
        return tuple(out)
