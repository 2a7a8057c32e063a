"""Read the facts the rule matcher needs from /proc, for one process or for all.

Kernel threads, zombies, threads that are not a process's main thread, and processes that
exit (or whose pid is reused) while being read yield no facts.  ``proc_root`` is a
parameter for tests; the executable's file id is read through ``/proc/PID/exe``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from .match import ProcessFacts

PF_KTHREAD = 0x00200000
DELETED_SUFFIX = " (deleted)"
PROC = "/proc"


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return None


def _stat_fields(pid: int, proc_root: str) -> list[str] | None:
    raw = _read(f"{proc_root}/{pid}/stat")
    if not raw:
        return None
    text = raw.decode("utf-8", "replace")
    # comm may hold spaces and parentheses: the fields start after the last ')'
    end = text.rfind(")")
    if end < 0:
        return None
    return text[end + 2:].split()


def start_time(pid: int, proc_root: str = PROC) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot), or None if there is no such
    process.  With the pid it identifies one process for the machine's uptime."""
    fields = _stat_fields(pid, proc_root)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[19])


def _flags_and_start(pid: int, proc_root: str) -> tuple[int, int] | None:
    fields = _stat_fields(pid, proc_root)
    if fields is None or len(fields) < 20:
        return None
    return int(fields[6]), int(fields[19])  # fields 9 (flags) and 22 (starttime)


def read_exe(pid: int, proc_root: str = PROC) -> tuple[str, tuple[int, int] | None] | None:
    """(path of the executable, its (st_dev, st_ino)) or None.  The kernel appends
    " (deleted)" to the path of a file that was unlinked or replaced (a package upgrade
    renames a new file over the old one); the suffix is removed when the file the process
    runs really has no link left, so a rule on the path still matches it."""
    link = f"{proc_root}/{pid}/exe"
    try:
        path = os.readlink(link)
    except OSError:
        return None
    try:
        st = os.stat(link)
        file_id: tuple[int, int] | None = (st.st_dev, st.st_ino)
        unlinked = st.st_nlink == 0
    except OSError:
        file_id, unlinked = None, path.endswith(DELETED_SUFFIX)
    if unlinked and path.endswith(DELETED_SUFFIX):
        path = path[:-len(DELETED_SUFFIX)]
    return path, file_id


def _real_uid_and_tgid(pid: int, proc_root: str) -> tuple[int, int] | None:
    raw = _read(f"{proc_root}/{pid}/status")
    if raw is None:
        return None
    uid = tgid = None
    for line in raw.decode("utf-8", "replace").splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[1])
        elif line.startswith("Tgid:"):
            tgid = int(line.split()[1])
    if uid is None or tgid is None:
        return None
    return uid, tgid


def cgroup2_path(pid: int, proc_root: str = PROC) -> str | None:
    """The process's cgroup2 path (the ``0::`` line of /proc/PID/cgroup): '' when it has no
    cgroup2 membership (a v1-only system), None when there is no such process."""
    raw = _read(f"{proc_root}/{pid}/cgroup")
    if raw is None:
        return None
    for line in raw.decode("utf-8", "replace").splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


def read_facts(pid: int, proc_root: str = PROC) -> ProcessFacts | None:
    """The facts of process ``pid``, or None (see the module docstring)."""
    first = _flags_and_start(pid, proc_root)
    if first is None or first[0] & PF_KTHREAD:
        return None
    ids = _real_uid_and_tgid(pid, proc_root)
    if ids is None or ids[1] != pid:
        return None
    exe = read_exe(pid, proc_root)
    raw_cmdline = _read(f"{proc_root}/{pid}/cmdline")
    raw_comm = _read(f"{proc_root}/{pid}/comm")
    cgroup = cgroup2_path(pid, proc_root)
    if exe is None or raw_cmdline is None or raw_comm is None or cgroup is None:
        return None
    # read the start time again: a process that exited meanwhile (its pid maybe reused)
    # must not lend its facts to another
    last = _flags_and_start(pid, proc_root)
    if last is None or last[1] != first[1]:
        return None
    args = [a.decode("utf-8", "replace") for a in raw_cmdline.split(b"\0")]
    if args and args[-1] == "":
        args.pop()
    comm = raw_comm.decode("utf-8", "replace")
    if comm.endswith("\n"):
        comm = comm[:-1]
    return ProcessFacts(pid=pid, start_time=first[1], exe=exe[0], comm=comm,
                        cmdline=" ".join(args), uid=ids[0], cgroup=cgroup, exe_id=exe[1])


def all_pids(proc_root: str = PROC) -> list[int]:
    try:
        return sorted(int(d) for d in os.listdir(proc_root) if d.isdigit())
    except OSError:
        return []


def iter_facts(proc_root: str = PROC) -> Iterator[ProcessFacts]:
    """Facts of every user-space process, by pid."""
    for pid in all_pids(proc_root):
        facts = read_facts(pid, proc_root)
        if facts is not None:
            yield facts
