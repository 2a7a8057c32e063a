"""`chadthrottlectl top`: a live rich table of ListProcesses, `q` to quit.

Live, it follows the daemon's ``Stats`` signal (Subscribe; signals taken from the daemon's
unique name only, see :class:`~chadthrottle.cli.client.StatsFeed`) when the interval is
one the daemon serves (0.25 … 10 s), and polls ListProcesses otherwise or when the daemon
does not know Subscribe.  When stdout is not a terminal it prints one snapshot and returns
(the caller decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import termios
import tty
from collections.abc import Iterator

from rich.console import Console
from rich.live import Live

from chadthrottle import names
from chadthrottle.cli.client import Client, DaemonError, StatsFeed
from chadthrottle.cli.render import top_table
from chadthrottle.safetext import printable

QUIT_KEYS = frozenset("qQ\x1b")  # q, Q, Esc
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"


def caption(version: str | None, count: int, interval: float, live: bool) -> str:
    parts = [f"chadthrottled {printable(version)}" if version else "chadthrottled",
             f"{count} process{'es' if count != 1 else ''} with traffic"]
    if live:
        parts.append(f"every {interval:g} s · q to quit")
    return " · ".join(parts)


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[bool]:
    """Put a terminal stdin into cbreak mode (keys arrive unbuffered); restore on exit."""
    try:
        if not os.isatty(fd):
            yield False
            return
        old = termios.tcgetattr(fd)
    except (OSError, termios.error):
        yield False
        return
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


async def snapshot(client: Client) -> list[dict]:
    return await client.list_processes()


async def live(client: Client, interval: float, iterations: int | None,
               console: Console | None = None) -> None:
    """Refresh every `interval` seconds until `q` (or `iterations` refreshes)."""
    console = console or Console(highlight=False, markup=False, emoji=False)
    try:
        version = await client.get_property("Version")
    except Exception:  # noqa: BLE001 - the caption is cosmetic
        version = None
    loop = asyncio.get_running_loop()
    keys: asyncio.Queue[str] = asyncio.Queue()
    stdin_fd = sys.stdin.fileno() if sys.stdin else -1
    with _cbreak(stdin_fd) as reading:
        if reading:
            def on_key() -> None:
                try:
                    data = os.read(stdin_fd, 64)
                except OSError:
                    data = b""
                if not data:
                    loop.remove_reader(stdin_fd)
                    return
                for ch in data.decode("utf-8", "replace"):
                    keys.put_nowait(ch)
            loop.add_reader(stdin_fd, on_key)
        try:
            await _show(client, console, version, keys, interval, iterations)
        finally:
            if reading:
                loop.remove_reader(stdin_fd)


async def _show(client: Client, console: Console, version: str | None,
                keys: asyncio.Queue[str], interval: float, iterations: int | None) -> None:
    feed: StatsFeed | None = None
    if names.STATS_INTERVAL_MIN_MS <= interval * 1000 <= names.STATS_INTERVAL_MAX_MS:
        feed = StatsFeed(client, round(interval * 1000))
        try:
            await feed.__aenter__()
        except DaemonError as e:
            if e.name != UNKNOWN_METHOD:
                raise
            feed = None  # an older daemon: poll

    async def next_rows() -> list[dict]:
        if feed is not None:
            return await feed.next()
        await asyncio.sleep(interval)
        return await client.list_processes()

    rows_task: asyncio.Future | None = None
    key_task: asyncio.Future | None = None
    try:
        procs = await client.list_processes()
        with Live(top_table(procs, caption(version, len(procs), interval, True)),
                  console=console, auto_refresh=False, screen=True,
                  transient=True) as view:
            done = 1
            while iterations is None or done < iterations:
                rows_task = rows_task or asyncio.ensure_future(next_rows())
                key_task = key_task or asyncio.ensure_future(keys.get())
                ready, _ = await asyncio.wait({rows_task, key_task},
                                              return_when=asyncio.FIRST_COMPLETED)
                if key_task in ready:
                    key = key_task.result()
                    key_task = None
                    if key in QUIT_KEYS:
                        break
                    procs = await client.list_processes()  # any other key redraws now
                if rows_task in ready:
                    procs = rows_task.result()
                    rows_task = None
                    done += 1
                view.update(top_table(procs, caption(version, len(procs), interval, True)),
                            refresh=True)
        if iterations is not None:  # a bounded run leaves its last table on screen
            console.print(top_table(procs, caption(version, len(procs), interval, False)))
    finally:
        for task in (rows_task, key_task):
            if task is not None:
                task.cancel()
        if feed is not None:
            await feed.__aexit__(None, None, None)
