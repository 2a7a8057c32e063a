"""Processes as the kernel shows them: validation, names, descendants, and an exact handle
(a pidfd with the start time) for everything the daemon does to a process.

The daemon never duplicates another process's file descriptors: sockets are tagged and read
from the kernel side (BPF iterators), so nothing a process does to its sockets can block the
daemon, and the daemon never holds a peer's socket open."""

from __future__ import annotations

import os
import select
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import NoSuchProcess

PF_KTHREAD = 0x00200000
PID_MAX_LIMIT = 1 << 22


def terminate(proc: subprocess.Popen, timeout: float = 5.0) -> int | None:
    """End a child we started: SIGTERM, then SIGKILL after timeout; its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _stat_fields(pid: int) -> list[str]:
    try:
        raw = _read(f"/proc/{pid}/stat").decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NoSuchProcess(f"no process {pid}") from exc
    # comm may contain spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def text(raw: bytes) -> str:
    """Bytes a process chose (its name, its program's path, a cgroup's name) as text: they
    need not be UTF-8, and what leaves the daemon (a D-Bus string, a metric label) must be;
    a byte that is not is shown as U+FFFD."""
    return raw.decode("utf-8", "replace")


def comm(pid: int) -> str:
    try:
        return text(_read(f"/proc/{pid}/comm")).strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def tgid(pid: int) -> int:
    try:
        for line in _read(f"/proc/{pid}/status").split(b"\n"):
            if line.startswith(b"Tgid:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NoSuchProcess(f"no process {pid}") from exc
    raise NoSuchProcess(f"no process {pid}")


def check_process(pid: int) -> None:
    """A user-space process that exists and is a process (not one of its threads)."""
    if pid <= 0 or pid >= PID_MAX_LIMIT:
        raise NoSuchProcess(f"no process {pid}")
    fields = _stat_fields(pid)
    flags = int(fields[6])  # field 9 of /proc/PID/stat
    if flags & PF_KTHREAD:
        raise NoSuchProcess(f"{pid} is a kernel thread, not a process")
    owner = tgid(pid)
    if owner != pid:
        raise NoSuchProcess(f"{pid} is a thread of process {owner}; limit the process")


def start_time(pid: int) -> int:
    return int(_stat_fields(pid)[19])


def children(pid: int) -> list[int]:
    """Direct child processes (of every thread of pid)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


def descendants(pid: int) -> list[int]:
    seen: list[int] = []
    todo = children(pid)
    while todo:
        c = todo.pop()
        if c in seen:
            continue
        seen.append(c)
        todo += children(c)
    return seen


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def uid(pid: int) -> int:
    """Real uid (the first field of Uid: in /proc/PID/status)."""
    try:
        for line in text(_read(f"/proc/{pid}/status")).splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NoSuchProcess(f"no process {pid}") from exc
    raise NoSuchProcess(f"no process {pid}")


def exe(pid: int) -> str:
    """The executable's path ("" if unreadable), without the " (deleted)" of a replaced file."""
    try:
        path = text(os.readlink(f"/proc/{pid}/exe".encode()))
    except OSError:
        return ""
    return path.removesuffix(" (deleted)")


def state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat ("Z" zombie, "X" dead, ...)."""
    return _stat_fields(pid)[0]


@dataclass(frozen=True)
class Process:
    """One process, exactly: a pidfd (which names this process and no later one with the
    same pid) and its start time.  Open it first, check and authorize through it, then act
    through it: the check and the use are about the same process."""

    pid: int
    pidfd: int
    start_time: int

    def exited(self) -> bool:
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return bool(p.poll(0))

    def alive(self) -> bool:
        """Still running (not exited, not a zombie) and still the same process."""
        if self.exited():
            return False
        try:
            fields = _stat_fields(self.pid)
        except NoSuchProcess:
            return False
        return int(fields[19]) == self.start_time and fields[0] not in "ZX"

    def uid(self) -> int:
        """Real uid, read after checking that the pid still names this process."""
        value = uid(self.pid)
        if not self.alive():
            raise NoSuchProcess(f"process {self.pid} exited")
        return value

    def close(self) -> None:
        try:
            os.close(self.pidfd)
        except OSError:
            pass

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_process(pid: int) -> Process:
    """A Process for a live user-space process (NoSuchProcess otherwise)."""
    check_process(pid)
    try:
        fd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError) as exc:
        raise NoSuchProcess(f"no process {pid}") from exc
    try:
        fields = _stat_fields(pid)
        if fields[0] in "ZX":
            raise NoSuchProcess(f"process {pid} has exited")
        return Process(pid, fd, int(fields[19]))
    except BaseException:
        os.close(fd)
        raise
