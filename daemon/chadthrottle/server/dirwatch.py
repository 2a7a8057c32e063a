"""Watching the directories of exe rules (inotify).

A package upgrade replaces a binary by renaming a new file over it: same path, new inode.
The exec matcher decides exe rules by inode, so the daemon learns the new one when the
directory changes (and, meanwhile, the kernel reports execs of files it does not know in a
watched directory, which user space decides by path).

inotify is three system calls; they are declared here through ctypes (the standard library
has no binding, and no maintained one is packaged by the distributions the daemon targets).
The descriptor is watched by the daemon's asyncio loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import struct
from collections.abc import Callable, Iterable

log = logging.getLogger("chadthrottle.rules")

IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
#: what changes the set of files a pattern names
MASK = (IN_CREATE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CLOSE_WRITE | IN_ATTRIB
        | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
#: changes within this time are acted on once (dpkg writes, renames, sets modes)
SETTLE = 0.2
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_init1.restype = ctypes.c_int
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_add_watch.restype = ctypes.c_int
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.inotify_rm_watch.restype = ctypes.c_int


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class DirWatch:
    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._fd = _check(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC), "inotify_init1")
        self._wd: dict[str, int] = {}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)
        self._pending: asyncio.TimerHandle | None = None

    def watch(self, dirs: Iterable[str]) -> None:
        """Watch exactly these directories from now on."""
        want = set(dirs)
        for d in list(self._wd):
            if d not in want:
                _libc.inotify_rm_watch(self._fd, self._wd.pop(d))
        for d in want - set(self._wd):
            try:
                self._wd[d] = _check(_libc.inotify_add_watch(self._fd, os.fsencode(d), MASK),
                                     f"watch {d}")
            except OSError as e:
                log.debug("cannot watch %s: %s", d, e)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        pos = 0
        while pos + _EVENT.size <= len(data):
            _wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            pos += _EVENT.size + length
            log.debug("a watched directory changed (mask %#x)", mask)
        if self._pending is None:
            self._pending = self._loop.call_later(SETTLE, self._fire)

    def _fire(self) -> None:
        self._pending = None
        try:
            self._on_change()
        except Exception:
            log.exception("re-reading exe rules failed")

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
