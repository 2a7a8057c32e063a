"""`chadthrottlectl top`: a live rich table of ListProcesses, `q` to quit.

When stdout is not a terminal it prints one snapshot and returns (the caller decides).
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

from chadthrottle.cli.client import Client
from chadthrottle.cli.render import top_table
from chadthrottle.safetext import printable

QUIT_KEYS = frozenset("qQ\x1b")  # q, Q, Esc


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
            procs = await client.list_processes()
            with Live(top_table(procs, caption(version, len(procs), interval, True)),
                      console=console, auto_refresh=False, screen=True,
                      transient=True) as view:
                done = 1
                while iterations is None or done < iterations:
                    try:
                        key: str | None = await asyncio.wait_for(keys.get(), interval)
                    except TimeoutError:
                        key = None
                    if key is not None and key in QUIT_KEYS:
                        break
                    procs = await client.list_processes()
                    view.update(top_table(procs, caption(version, len(procs), interval, True)),
                                refresh=True)
                    if key is None:  # any other key only redraws now
                        done += 1
            if iterations is not None:  # a bounded run leaves its last table on screen
                console.print(top_table(procs, caption(version, len(procs), interval, False)))
        finally:
            if reading:
                loop.remove_reader(stdin_fd)
