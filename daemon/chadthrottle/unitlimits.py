"""Unit limits: one budget for a whole cgroup (a systemd unit or a cgroup path).

Packets are matched by the ancestor cgroup ids of their socket at the levels where unit
limits exist (a bitmask, so no unit limit costs nothing).  A unit limit follows the unit by
its path: when the cgroup is removed and created again (``systemctl restart``), the kernel
reports both and the limit moves to the new cgroup id.
"""

from __future__ import annotations

import ctypes
import logging
import time
from dataclasses import dataclass

from . import abi, cgroups, cgwatch, libbpf, names
from .budgets import burst_for, check_rate
from .errors import InvalidLimit, NoSuchLimit, NoSuchUnit, Unsupported
from .shaping.pacing import mss_for, slack_for

log = logging.getLogger("chadthrottle.units")
OWNER = "unit:"


@dataclass(frozen=True)
class UnitLimit:
    cgroup: str  # path relative to the cgroup2 mount ("" = the root)
    cgroup_id: int
    download: int
    upload: int


@dataclass
class _Unit:
    rel: str
    cgroup_id: int  # 0 while the cgroup does not exist
    level: int
    download: int
    upload: int
    gen: int = 1


class UnitLimits:
    def __init__(self, kernel, cg: cgroups.Cgroups, attachments, watches: cgwatch.Watches,
                 pacer) -> None:
        self._kernel = kernel
        self._cg = cg
        self._attach = attachments
        self._watches = watches
        self._pacer = pacer
        self._units: dict[str, _Unit] = {}
        #: called with (cgroup id, download rate) when a unit's download rate changes or it
        #: goes (rate 0)
        self.listeners: list = []

    def set(self, unit_or_cgroup: str, download: int, upload: int) -> UnitLimit | None:
        check_rate(download, "download")
        check_rate(upload, "upload")
        if not isinstance(unit_or_cgroup, str):
            raise NoSuchUnit(f"no such unit or cgroup: {unit_or_cgroup!r}")
        rel = self._cg.resolve(unit_or_cgroup)
        if rel == "":
            raise InvalidLimit("the cgroup2 root cannot be limited: it would limit the system")
        if download == 0 and upload == 0:
            if rel in self._units:
                self.clear(rel)
            return None
        # the kernel counts levels from the real root (a container's is deeper)
        lvl = cgroups.level(rel) + self._kernel.cgroup_level
        if lvl >= abi.MAX_LEVELS:
            raise Unsupported(f"cgroup {rel} is {lvl} levels deep; at most "
                              f"{abi.MAX_LEVELS - 1} are supported")
        u = self._units.get(rel)
        if u is not None and u.cgroup_id:
            u.download, u.upload, u.gen = download, upload, u.gen + 1
            self._write_cfg(u)
            self._kernel.bump_cfg_gen()
            self._pacer.repace()
            for fn in self.listeners:
                fn(u.cgroup_id, download)
        else:
            if u is None and len(self._units) >= abi.MAX_UNITS:
                raise InvalidLimit(f"too many unit limits (at most {abi.MAX_UNITS})")
            u = _Unit(rel, self._cg.cgroup_id(rel), lvl, download, upload)
            self._attach.ensure_for_cgroup(rel)
            self._create(u)
            self._units[rel] = u
            self._watch(u)
        self._write_levels()
        self._tag_existing(u)
        log.info("cgroup %s: limit download=%d B/s upload=%d B/s", cgroups.display(rel),
                 download, upload)
        return UnitLimit(rel, u.cgroup_id, download, upload)

    def clear(self, unit_or_cgroup: str) -> None:
        rel = self._cg.resolve(unit_or_cgroup) if isinstance(unit_or_cgroup, str) else None
        u = self._units.pop(rel, None) if rel is not None else None
        if u is None:
            # a limited cgroup that is gone right now is still cleared by its path
            key = cgroups.norm(unit_or_cgroup) if isinstance(unit_or_cgroup, str) else None
            u = self._units.pop(key, None) if key is not None else None
        if u is None:
            raise NoSuchLimit(f"{unit_or_cgroup!r} has no limit")
        self._remove(u)
        self._unwatch(u)
        self._write_levels()
        self._pacer.repace()
        log.info("cgroup %s: limit cleared", cgroups.display(u.rel))

    def list(self) -> list[UnitLimit]:
        return [UnitLimit(u.rel, u.cgroup_id, u.download, u.upload)
                for u in sorted(self._units.values(), key=lambda u: u.rel)]

    def read(self, cgroup_id: int) -> abi.Limit | None:
        v = abi.Limit()
        if libbpf.map_lookup(self._kernel.fd(names.MAP_UNIT_LIMITS), ctypes.c_uint64(cgroup_id),
                             v, libbpf.BPF_F_LOCK):
            return v
        return None

    def __len__(self) -> int:
        return len(self._units)

    # -- kernel side -----------------------------------------------------------------------
    def _cfg(self, u: _Unit) -> abi.LimitCfg:
        c = abi.LimitCfg()
        c.rate[abi.DIR_DOWNLOAD], c.rate[abi.DIR_UPLOAD] = u.download, u.upload
        c.burst[abi.DIR_DOWNLOAD] = burst_for(u.download)
        c.burst[abi.DIR_UPLOAD] = burst_for(u.upload)
        c.gen = u.gen
        c.mss = mss_for(u.download, u.upload)
        c.slack[abi.DIR_DOWNLOAD] = slack_for(u.download, c.mss)
        c.slack[abi.DIR_UPLOAD] = slack_for(u.upload, c.mss)
        return c

    def _write_cfg(self, u: _Unit) -> None:
        libbpf.map_update(self._kernel.fd(names.MAP_UNIT_CFG), ctypes.c_uint64(u.cgroup_id),
                          self._cfg(u))

    def _create(self, u: _Unit) -> None:
        for fn in self.listeners:
            fn(u.cgroup_id, u.download)
        cfg = self._cfg(u)
        lim = abi.Limit()
        now = time.monotonic_ns()
        for d in range(abi.DIRS):
            lim.dir[d].rate, lim.dir[d].burst = cfg.rate[d], cfg.burst[d]
            lim.dir[d].slack = cfg.slack[d]
            lim.dir[d].tokens = 1 if cfg.rate[d] else 0
            lim.dir[d].last_ns = now
        lim.cfg_gen = self._kernel.config.cfg_gen
        lim.set_gen = cfg.gen
        key = ctypes.c_uint64(u.cgroup_id)
        libbpf.map_update(self._kernel.fd(names.MAP_UNIT_CFG), key, cfg)
        libbpf.map_update(self._kernel.fd(names.MAP_UNIT_LIMITS), key, lim)

    def _remove(self, u: _Unit) -> None:
        if not u.cgroup_id:
            return
        for fn in self.listeners:
            fn(u.cgroup_id, 0)
        key = ctypes.c_uint64(u.cgroup_id)
        libbpf.map_delete(self._kernel.fd(names.MAP_UNIT_LIMITS), key)
        libbpf.map_delete(self._kernel.fd(names.MAP_UNIT_CFG), key)
        self._watches.discard(u.cgroup_id, cgwatch.RMDIR, OWNER + u.rel)

    def _write_levels(self) -> None:
        levels = 0
        for u in self._units.values():
            if u.cgroup_id:
                levels |= 1 << u.level
        if levels != self._kernel.config.unit_levels:
            self._kernel.config.unit_levels = levels
            self._kernel.write_config()

    def _tag_existing(self, u: _Unit) -> None:
        """Sockets that exist in the unit learn it now (new ones on their first packet)."""
        self._kernel.tag_sockets(abi.ITER_UNIT, budget=u.cgroup_id, tgid=u.level)
        self._pacer.repace()

    def _parent_id(self, u: _Unit) -> int | None:
        parent = u.rel.rsplit("/", 1)[0] if "/" in u.rel else ""
        try:
            return self._cg.cgroup_id(parent)
        except OSError:
            return None

    def _watch(self, u: _Unit) -> None:
        self._watches.add(u.cgroup_id, cgwatch.RMDIR, OWNER + u.rel)
        pid = self._parent_id(u)
        if pid is not None:
            self._watches.add(pid, cgwatch.MKDIR, OWNER + u.rel)

    def _unwatch(self, u: _Unit) -> None:
        pid = self._parent_id(u)
        if pid is not None:
            self._watches.discard(pid, cgwatch.MKDIR, OWNER + u.rel)

    # -- cgroup events ---------------------------------------------------------------------
    def on_rmdir(self, cgid: int) -> bool:
        for u in self._units.values():
            if u.cgroup_id == cgid:
                log.info("cgroup %s was removed; its limit waits for it to come back",
                         cgroups.display(u.rel))
                self._remove(u)
                u.cgroup_id = 0
                self._write_levels()
                return True
        return False

    def on_mkdir(self, cgid: int, parent_cgid: int) -> bool:
        for u in self._units.values():
            if u.cgroup_id:
                continue
            try:
                if self._cg.cgroup_id(u.rel) != cgid:
                    continue
            except OSError:
                continue
            u.cgroup_id = cgid
            u.gen += 1
            self._create(u)
            self._watches.add(cgid, cgwatch.RMDIR, OWNER + u.rel)
            self._write_levels()
            log.info("cgroup %s is back (id %d): its limit follows it", cgroups.display(u.rel),
                     cgid)
            return True
        return False
