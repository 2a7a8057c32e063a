"""What the main list shows, as plain data (no GTK, no bus): processes from the daemon's
Stats rows, grouped into applications, with 60 seconds of rate history each.

Rows are the ListProcesses / Stats dictionaries of the contract (DESIGN §2, §2b).  Every key
may be absent (today's daemon sends no ``exe``, ``uid``, ``unit`` or ``rule``): an
application is keyed by ``exe`` and falls back to ``comm``; a missing ``uid`` is read from
the owner of ``/proc/PID`` (a fact of the local system, not of the daemon).

A process that stops moving bytes drops out of the daemon's rows; it stays listed with a
zero rate for :data:`FORGET_AFTER` seconds so the list does not flicker, and as long as it
is limited.
"""

from __future__ import annotations

import os
import pwd
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from chadthrottle.gui import text

HISTORY = 60  # samples (one a second): the sparkline's 60 seconds
FORGET_AFTER = 60.0


def _owner_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


_user_names: dict[int, str] = {}


def user_name(uid: int | None) -> str:
    if uid is None:
        return ""
    name = _user_names.get(uid)
    if name is None:
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        _user_names[uid] = name
    return name


def app_key(exe: str, comm: str) -> str:
    return f"exe:{exe}" if exe else f"comm:{comm}"


def app_name(exe: str, comm: str) -> str:
    if exe:
        base = exe.rstrip("/").rsplit("/", 1)[-1]
        # the kernel appends " (deleted)" to the link of a replaced executable
        return base.removesuffix(" (deleted)") or exe
    return comm or "?"


@dataclass
class Proc:
    pid: int
    comm: str = ""
    exe: str = ""
    uid: int | None = None
    unit: str = ""
    cgroup: str = ""
    rule: str = ""
    status: str = ""
    download_rate: float = 0.0
    upload_rate: float = 0.0
    download_bytes: int = 0
    upload_bytes: int = 0
    download_limit: int = 0
    upload_limit: int = 0
    last_active: float = 0.0
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))

    @property
    def rate(self) -> float:
        return self.download_rate + self.upload_rate

    @property
    def limited(self) -> bool:
        return bool(self.download_limit or self.upload_limit)

    @property
    def key(self) -> str:
        return app_key(self.exe, self.comm)

    @property
    def name(self) -> str:
        return self.comm or (app_name(self.exe, "") if self.exe else "") or f"PID {self.pid}"

    @property
    def user(self) -> str:
        return user_name(self.uid)

    @property
    def accessible_name(self) -> str:
        """What a screen reader says first: ``curl (PID 1234)``."""
        return f"{self.name} (PID {self.pid})"

    @property
    def unit_target(self) -> str:
        """The unit or cgroup a unit limit would apply to, or "" if there is none to offer
        (the cgroup2 root would be the whole machine)."""
        if self.unit:
            return self.unit
        if self.cgroup and self.cgroup.strip("/"):
            return self.cgroup
        return ""

    def apply(self, row: Mapping[str, Any], uid_lookup: Callable[[int], int | None]) -> None:
        self.comm = str(row.get("comm", self.comm) or "")
        self.exe = str(row.get("exe", self.exe) or "")
        if "uid" in row:
            self.uid = int(row["uid"])
        elif self.uid is None:
            self.uid = uid_lookup(self.pid)
        self.unit = str(row.get("unit", "") or "")
        self.cgroup = str(row.get("cgroup", self.cgroup) or "")
        self.rule = str(row.get("rule", "") or "")
        self.status = str(row.get("status", "") or "")
        self.download_rate = _num(row.get("download_rate"), float)
        self.upload_rate = _num(row.get("upload_rate"), float)
        self.download_bytes = _num(row.get("download_bytes", self.download_bytes), int)
        self.upload_bytes = _num(row.get("upload_bytes", self.upload_bytes), int)
        self.download_limit = _num(row.get("download_limit"), int)
        self.upload_limit = _num(row.get("upload_limit"), int)


def _num(value: Any, kind: type) -> Any:
    try:
        v = kind(value)
    except (TypeError, ValueError):
        return kind(0)
    return v if v >= 0 else kind(0)


@dataclass
class App:
    key: str
    exe: str
    comm: str
    procs: dict[int, Proc] = field(default_factory=dict)
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))

    @property
    def name(self) -> str:
        return app_name(self.exe, self.comm)

    @property
    def download_rate(self) -> float:
        return sum(p.download_rate for p in self.procs.values())

    @property
    def upload_rate(self) -> float:
        return sum(p.upload_rate for p in self.procs.values())

    @property
    def rate(self) -> float:
        return self.download_rate + self.upload_rate

    @property
    def download_bytes(self) -> int:
        return sum(p.download_bytes for p in self.procs.values())

    @property
    def upload_bytes(self) -> int:
        return sum(p.upload_bytes for p in self.procs.values())

    @property
    def limited_count(self) -> int:
        return sum(1 for p in self.procs.values() if p.limited)

    @property
    def common_limit(self) -> tuple[int, int] | None:
        """The limit every process has, if they all have the same one."""
        limits = {(p.download_limit, p.upload_limit) for p in self.procs.values()}
        return limits.pop() if len(limits) == 1 else None

    @property
    def status(self) -> str:
        seen = {p.status for p in self.procs.values()}
        for s in text.STATUS_ORDER:
            if s in seen:
                return s
        return next(iter(seen), "")

    @property
    def user(self) -> str:
        users = {p.user for p in self.procs.values()}
        if len(users) == 1:
            return users.pop()
        return f"{len(users)} users"

    @property
    def uids(self) -> set[int | None]:
        return {p.uid for p in self.procs.values()}

    @property
    def rules(self) -> set[str]:
        return {p.rule for p in self.procs.values() if p.rule}

    @property
    def accessible_name(self) -> str:
        n = len(self.procs)
        return f"{self.name} (application, {n} process{'es' if n != 1 else ''})"

    def sorted_procs(self) -> list[Proc]:
        return sorted(self.procs.values(), key=lambda p: (-p.rate, p.pid))


@dataclass
class Changes:
    """What an update did to the set of rows (the window adds and removes widgets)."""
    added_apps: list[App] = field(default_factory=list)
    removed_apps: list[App] = field(default_factory=list)
    added_procs: list[Proc] = field(default_factory=list)
    removed_procs: list[Proc] = field(default_factory=list)
    moved_procs: list[tuple[Proc, str]] = field(default_factory=list)  # (proc, old app key)


class Model:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 uid_lookup: Callable[[int], int | None] = _owner_of,
                 forget_after: float = FORGET_AFTER) -> None:
        self.clock = clock
        self.uid_lookup = uid_lookup
        self.forget_after = forget_after
        self.procs: dict[int, Proc] = {}
        self.apps: dict[str, App] = {}
        self.total_download = 0.0
        self.total_upload = 0.0
        self.samples = 0

    # --- updates ------------------------------------------------------------------------------
    def update(self, rows: Iterable[Mapping[str, Any]]) -> Changes:
        """One sample (a Stats signal or a ListProcesses reply)."""
        now = self.clock()
        ch = Changes()
        seen: set[int] = set()
        total_d = total_u = 0.0
        for row in rows:
            try:
                pid = int(row.get("pid", 0))
            except (TypeError, ValueError):
                continue
            if pid <= 0 or pid in seen:
                continue
            seen.add(pid)
            proc = self.procs.get(pid)
            old_key = proc.key if proc is not None else None
            if proc is None:
                proc = Proc(pid=pid)
                self.procs[pid] = proc
                ch.added_procs.append(proc)
            proc.apply(row, self.uid_lookup)
            proc.last_active = now
            total_d += proc.download_rate
            total_u += proc.upload_rate
            if old_key is not None and old_key != proc.key:
                self._detach(proc, old_key, ch)
                ch.moved_procs.append((proc, old_key))
            self._attach(proc, ch)
        self.total_download, self.total_upload = total_d, total_u
        for pid, proc in list(self.procs.items()):
            if pid not in seen:
                proc.download_rate = proc.upload_rate = 0.0
                if not proc.limited and now - proc.last_active > self.forget_after:
                    self.remove_process(pid, ch)
                    continue
            proc.history.append((proc.download_rate, proc.upload_rate))
        for app in self.apps.values():
            app.history.append((app.download_rate, app.upload_rate))
        self.samples += 1
        return ch

    def remove_process(self, pid: int, ch: Changes | None = None) -> Changes:
        """The process is gone (LimitRemoved "exited", or forgotten)."""
        ch = ch if ch is not None else Changes()
        proc = self.procs.pop(pid, None)
        if proc is not None:
            ch.removed_procs.append(proc)
            self._detach(proc, proc.key, ch)
        return ch

    def set_limit(self, pid: int, download: int, upload: int) -> Proc | None:
        """A LimitChanged / LimitRemoved signal or the Limits property, before the next
        sample shows it."""
        proc = self.procs.get(pid)
        if proc is not None:
            proc.download_limit, proc.upload_limit = int(download), int(upload)
        return proc

    def _attach(self, proc: Proc, ch: Changes) -> None:
        app = self.apps.get(proc.key)
        if app is None:
            app = App(key=proc.key, exe=proc.exe, comm=proc.comm)
            # a new application's history starts with the zeros it did not have
            app.history.extend([(0.0, 0.0)] * min(self.samples, HISTORY))
            self.apps[proc.key] = app
            ch.added_apps.append(app)
        app.procs[proc.pid] = proc

    def _detach(self, proc: Proc, key: str, ch: Changes) -> None:
        app = self.apps.get(key)
        if app is None:
            return
        app.procs.pop(proc.pid, None)
        if not app.procs:
            del self.apps[key]
            ch.removed_apps.append(app)

    # --- queries ------------------------------------------------------------------------------
    def sorted_apps(self) -> list[App]:
        """Busiest first (download + upload now), then by name: the list's order."""
        return sorted(self.apps.values(), key=lambda a: (-a.rate, a.name.lower(), a.key))

    def app_of(self, proc: Proc) -> App | None:
        return self.apps.get(proc.key)


def matches(query: str, *fields: object) -> bool:
    """Search: every word of the query appears in one of the fields (case-insensitive)."""
    words = query.lower().split()
    if not words:
        return True
    hay = " ".join(str(f) for f in fields if f is not None).lower()
    return all(w in hay for w in words)


def proc_matches(proc: Proc, query: str) -> bool:
    return matches(query, proc.name, proc.comm, proc.exe, proc.pid, proc.user, proc.unit)


def app_matches(app: App, query: str) -> bool:
    return matches(query, app.name, app.exe, app.comm)


def visible(app: App, proc: Proc | None, *, query: str, active_only: bool,
            expanded: bool) -> bool:
    """Whether a row is shown: ``proc`` None is the application's own row.

    Active only: an application with no traffic now is hidden, and so is an idle process.
    Search: an application is shown if it or any of its processes matches; its processes
    are shown (when expanded) if the application matches or they do.
    """
    if active_only and app.rate <= 0:
        return False
    if proc is None:
        return app_matches(app, query) or any(proc_matches(p, query)
                                              for p in app.procs.values())
    if not expanded:
        return False
    if active_only and proc.rate <= 0:
        return False
    return app_matches(app, query) or proc_matches(proc, query)
