"""Watching the directories of exe rules (inotify, through asyncinotify).

A package upgrade replaces a binary by renaming a new file over it: same path, new inode.
The exec matcher decides exe rules by inode, so the daemon learns the new one when the
directory changes (and, meanwhile, the kernel reports execs of files it does not know in a
watched directory, which user space decides by path).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from asyncinotify import Inotify, Mask

log = logging.getLogger("chadthrottle.rules")

#: what changes the set of files a pattern names
MASK = (Mask.CREATE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.DELETE | Mask.CLOSE_WRITE
        | Mask.ATTRIB | Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.ONLYDIR)
#: changes within this time are acted on once (dpkg writes, renames, sets modes)
SETTLE = 0.2


class DirWatch:
    def __init__(self, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._inotify = Inotify()
        self._watches: dict[str, object] = {}
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dirwatch")
        self._pending: asyncio.TimerHandle | None = None

    def watch(self, dirs: Iterable[str]) -> None:
        """Watch exactly these directories from now on."""
        want = set(dirs)
        for d in list(self._watches):
            if d not in want:
                try:
                    self._inotify.rm_watch(self._watches.pop(d))
                except (OSError, ValueError):
                    pass
        for d in want - set(self._watches):
            try:
                self._watches[d] = self._inotify.add_watch(d, MASK)
            except OSError as e:
                log.debug("cannot watch %s: %s", d, e)

    async def _run(self) -> None:
        async for event in self._inotify:
            log.debug("directory changed: %s %s", event.path, event.mask)
            loop = asyncio.get_running_loop()
            if self._pending is None:
                self._pending = loop.call_later(SETTLE, self._fire)

    def _fire(self) -> None:
        self._pending = None
        try:
            self._on_change()
        except Exception:
            log.exception("re-reading exe rules failed")

    def close(self) -> None:
        self._task.cancel()
        if self._pending is not None:
            self._pending.cancel()
        self._inotify.close()
