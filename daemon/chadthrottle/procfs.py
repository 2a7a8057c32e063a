"""Processes as the kernel shows them: validation, names, descendants, and their sockets
(duplicated through pidfd_getfd so the daemon can tag them or read TCP_INFO)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import NoSuchProcess

PF_KTHREAD = 0x00200000
SYS_PIDFD_GETFD = 438  # same number on every architecture (unified syscall table)
PID_MAX_LIMIT = 1 << 22
INET_FAMILIES = (socket.AF_INET, socket.AF_INET6)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_int, ctypes.c_uint]


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


def _stat_fields(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NoSuchProcess(f"no process {pid}") from exc
    # comm may contain spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2:].split()


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def tgid(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Tgid:"):
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
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NoSuchProcess(f"no process {pid}") from exc


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, targetfd, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pidfd_getfd({targetfd}): {os.strerror(err)}")
    return int(fd)


def _socket_fds(pid: int) -> list[int]:
    out = []
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return out
    for e in entries:
        try:
            if os.readlink(f"/proc/{pid}/fd/{e}").startswith("socket:"):
                out.append(int(e))
        except OSError:
            continue
    return out


@contextmanager
def inet_sockets(pid: int) -> Iterator[list[tuple[int, socket.socket]]]:
    """Duplicates of the process's IPv4/IPv6 sockets, closed on exit.  Processes that exit
    meanwhile simply yield nothing."""
    dups: list[tuple[int, socket.socket]] = []
    try:
        pidfd = os.pidfd_open(pid)
    except (ProcessLookupError, OSError):
        yield dups
        return
    try:
        for fd in _socket_fds(pid):
            try:
                dup = pidfd_getfd(pidfd, fd)
            except OSError:
                continue
            try:
                s = socket.socket(fileno=dup)
            except OSError:
                os.close(dup)
                continue
            if s.family in INET_FAMILIES:
                dups.append((fd, s))
            else:
                s.close()
        yield dups
    finally:
        for _, s in dups:
            s.close()
        os.close(pidfd)


# struct tcp_info (uapi/linux/tcp.h): offsets of the fields we read
_TCPI_TOTAL_RETRANS = 100
_TCPI_BYTES_ACKED = 120
_TCPI_BYTES_RECEIVED = 128
_TCPI_LEN = 136


def tcp_counters(s: socket.socket) -> tuple[int, int, int] | None:
    """(bytes received, bytes acked (sent), total retransmits) of a TCP socket."""
    if s.type != socket.SOCK_STREAM:
        return None
    try:
        raw = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_LEN)
    except OSError:
        return None
    if len(raw) < _TCPI_LEN:
        return None
    (retrans,) = struct.unpack_from("I", raw, _TCPI_TOTAL_RETRANS)
    acked, received = struct.unpack_from("QQ", raw, _TCPI_BYTES_ACKED)
    return received, acked, retrans
