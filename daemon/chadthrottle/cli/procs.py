"""Local process lookups for the CLI (by name, pid -> comm), read from /proc.

The daemon runs on the same machine and identifies processes by pid, so resolving a name
to a pid is the client's job.  ``proc_root`` is a parameter so tests can use a fake tree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Proc:
    pid: int
    comm: str
    cmdline: str


def comm_of(pid: int, proc_root: str = "/proc") -> str | None:
    try:
        with open(f"{proc_root}/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def _argv(pid: int, proc_root: str) -> list[str]:
    try:
        with open(f"{proc_root}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def matches(name: str, comm: str, argv: list[str]) -> bool:
    """True when `name` is the process's comm (kernel truncates it to 15 bytes) or the
    basename of its argv[0]."""
    if not name:
        return False
    if comm == name or (len(name) > 15 and comm == name[:15]):
        return True
    return bool(argv) and os.path.basename(argv[0]) == name


def find_by_name(name: str, proc_root: str = "/proc",
                 exclude: frozenset[int] | set[int] = frozenset()) -> list[Proc]:
    """Every user-space process called `name`, by pid; kernel threads (no argv) excluded."""
    found: list[Proc] = []
    try:
        entries = os.listdir(proc_root)
    except OSError:
        return found
    for entry in entries:
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid in exclude:
            continue
        comm = comm_of(pid, proc_root)
        if comm is None:
            continue
        argv = _argv(pid, proc_root)
        if not argv:  # kernel thread, or already a zombie
            continue
        if matches(name, comm, argv):
            found.append(Proc(pid, comm, " ".join(argv)))
    return sorted(found, key=lambda p: p.pid)
