"""A headless desktop for the applet's tests, every piece started here and stopped by pid:

* ``Xvfb`` on a free display (``-displayfd``);
* a private session bus (``dbus-daemon --session``), where GTK exports the application's
  actions and finds the accessibility bus;
* ``at-spi-bus-launcher`` (at-spi2-core): the accessibility bus, and through it
  ``at-spi2-registryd``, which pyatspi talks to;
* the applet itself, on the distribution's ``/usr/bin/python3``.

Children that those programs start (the accessibility bus's dbus-daemon) are found through
/proc before their parent is stopped and ended by pid too; so is the registry, which the
accessibility bus starts through activation (a double fork: its parent is init), found by
the desktop's directory in its environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "daemon"
SYSTEM_PYTHON = "/usr/bin/python3"
AT_SPI_LAUNCHER = "/usr/libexec/at-spi-bus-launcher"


def terminate(proc: subprocess.Popen, timeout: float = 5.0) -> int | None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid (children before grandchildren)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    out, frontier = [], [pid]
    while frontier:
        nxt = [p for p, pp in parents.items() if pp in frontier]
        out.extend(nxt)
        frontier = nxt
    return out


def _gone(pid: int) -> bool:
    """Ended: no such pid, or a zombie (whose parent will reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2:].split()[0] in ("Z", "X")


def end_pids(pids: list[int], timeout: float = 5.0) -> None:
    """SIGTERM each pid we started (directly or through our children), one after the
    other, then SIGKILL what did not end in time."""
    for pid in pids:
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + timeout
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _gone(pid):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def stop_tree(proc: subprocess.Popen | None) -> None:
    """End proc and what it started, grandchildren first, so that every process is reaped
    by its own (still living) parent and none is left to init as a zombie."""
    if proc is None:
        return
    if proc.poll() is None:
        end_pids(list(reversed(descendants(proc.pid))))
    terminate(proc)


def orphans_with(marker: str) -> list[int]:
    """Processes adopted by init whose environment names ``marker`` (a directory of ours):
    services that a bus of ours started through activation, which double-forks (the
    accessibility registry)."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            if int(stat[stat.rindex(")") + 2:].split()[1]) != 1:
                continue
            if needle in Path(f"/proc/{entry}/environ").read_bytes():
                found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def gui_deps_missing() -> str | None:
    """What the GUI tests need that this machine lacks (None: all there)."""
    for tool in ("Xvfb", "dbus-daemon"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not os.access(AT_SPI_LAUNCHER, os.X_OK):
        return f"{AT_SPI_LAUNCHER} is missing (at-spi2-core)"
    probe = ("import gi; gi.require_version('Gtk', '4.0'); gi.require_version('Adw', '1'); "
             "gi.require_version('Atspi', '2.0'); from gi.repository import Gtk, Adw, Atspi; "
             "import cairo, pyatspi")
    p = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return f"{SYSTEM_PYTHON} cannot import GTK 4/libadwaita/pyatspi: {p.stderr.strip()[-300:]}"
    return None


class Desktop:
    """Xvfb + a session bus + the accessibility bus.  ``env`` is what clients need."""

    def __init__(self, width: int = 1280, height: int = 800) -> None:
        self.size = (width, height)
        self.dir = Path(tempfile.mkdtemp(prefix="chadthrottle-desktop-"))
        self.xvfb: subprocess.Popen | None = None
        self.session: subprocess.Popen | None = None
        self.atspi: subprocess.Popen | None = None
        self.env: dict[str, str] = {}

    def start(self) -> Desktop:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        r, w = os.pipe()
        self.xvfb = subprocess.Popen(
            ["Xvfb", "-displayfd", str(w), "-screen", "0", f"{self.size[0]}x{self.size[1]}x24",
             "-nolisten", "tcp", "-noreset"],
            pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "xvfb.log", "wb"))  # noqa: SIM115 - the child keeps it
        os.close(w)
        display = b""
        deadline = time.monotonic() + 15
        while not display.endswith(b"\n"):
            if time.monotonic() > deadline or self.xvfb.poll() is not None:
                raise RuntimeError("Xvfb did not start: "
                                   + (self.dir / "xvfb.log").read_text(errors="replace"))
            chunk = os.read(r, 16)
            if not chunk:
                break
            display += chunk
        os.close(r)
        env = {k: v for k, v in os.environ.items()
               if k not in ("DBUS_SESSION_BUS_ADDRESS", "AT_SPI_BUS_ADDRESS", "WAYLAND_DISPLAY",
                            "NO_AT_BRIDGE", "GTK_A11Y")}
        env["DISPLAY"] = ":" + display.decode().strip()
        env["XDG_RUNTIME_DIR"] = str(self.dir / "runtime")
        env["XDG_CONFIG_HOME"] = str(self.dir / "config")
        env["XDG_CACHE_HOME"] = str(self.dir / "cache")
        env["HOME"] = str(self.dir / "home")
        for d in ("runtime", "config", "cache", "home"):
            (self.dir / d).mkdir(mode=0o700)
        env["GDK_BACKEND"] = "x11"
        env["GSK_RENDERER"] = "cairo"  # no GL on Xvfb
        env["GTK_A11Y"] = "atspi"
        self.session = subprocess.Popen(
            ["dbus-daemon", "--session", "--nofork", "--nopidfile", "--print-address=1",
             f"--address=unix:path={self.dir / 'runtime' / 'bus'}"],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env, text=True)
        assert self.session.stdout
        address = self.session.stdout.readline().strip()
        if not address:
            raise RuntimeError("the session dbus-daemon did not start")
        env["DBUS_SESSION_BUS_ADDRESS"] = address
        self.env = env
        self.atspi = subprocess.Popen(
            [AT_SPI_LAUNCHER, "--launch-immediately"], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=open(self.dir / "atspi.log", "wb"))  # noqa: SIM115
        deadline = time.monotonic() + 15
        while not self._a11y_bus_ready():
            if time.monotonic() > deadline or self.atspi.poll() is not None:
                raise RuntimeError("the accessibility bus did not start: "
                                   + (self.dir / "atspi.log").read_text(errors="replace"))
            time.sleep(0.1)

    def _a11y_bus_ready(self) -> bool:
        # NameHasOwner, never a call to the name: that would have the bus start a second
        # launcher through activation
        p = subprocess.run(
            ["dbus-send", "--session", "--print-reply", "--dest=org.freedesktop.DBus",
             "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
             "string:org.a11y.Bus"], env=self.env, capture_output=True, text=True, timeout=10)
        return p.returncode == 0 and "boolean true" in p.stdout

    def stop(self) -> None:
        end_pids(orphans_with(str(self.dir)))
        stop_tree(self.atspi)
        self.atspi = None
        stop_tree(self.session)
        self.session = None
        stop_tree(self.xvfb)
        self.xvfb = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Desktop:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Applet:
    """``python3 -m chadthrottle.gui`` on the system interpreter, on the given desktop and
    system bus."""

    def __init__(self, desktop: Desktop, system_bus: str, log: Path,
                 screenshot_dir: Path | None = None) -> None:
        env = dict(desktop.env)
        env["DBUS_SYSTEM_BUS_ADDRESS"] = system_bus
        env["PYTHONPATH"] = str(SRC)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        if screenshot_dir is not None:
            env["CHADTHROTTLE_GUI_SCREENSHOT_DIR"] = str(screenshot_dir)
        self.env = env
        self.log = log
        self.proc = subprocess.Popen([SYSTEM_PYTHON, "-m", "chadthrottle.gui"], env=env,
                                     stdin=subprocess.DEVNULL, stdout=open(log, "wb"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, cwd=str(desktop.dir))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int | None:
        """The applet first (it leaves the bus cleanly), then anything it left behind."""
        kids = descendants(self.proc.pid) if self.proc.poll() is None else []
        rc = terminate(self.proc)
        end_pids([k for k in reversed(kids) if not _gone(k)])
        return rc
