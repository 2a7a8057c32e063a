"""Issue 10: the applet, headless and real — Xvfb, a private system bus with the project's
policy, the real daemon, a real curl downloading from a local HTTP server.  The applet is
driven through AT-SPI (pyatspi) by accessible names only; what it did is checked over the
bus with dbus-send, and on curl's own output.

The run saves screenshots drawn by the applet (the daemon-not-running page, the editor, the
main list and the Limits tab).  With CHADTHROTTLE_GUI_SHOTS=DIR they are copied to DIR
(``CHADTHROTTLE_GUI_SHOTS=docs make test PYTEST_ARGS=tests/gui`` refreshes the README's).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from chadthrottle.bench.traffic import HttpServer, Transfer, paced_download

from .conftest import LineProgram, dbus_helpers, requires_bpf_object, requires_root
from .desktop import Applet, Desktop

pytestmark = [requires_root, requires_bpf_object, pytest.mark.slow, pytest.mark.gui]

DRIVER = Path(__file__).with_name("atspi_driver.py")
MiB = 1024 * 1024
CURL_OWN_CAP = "20M"  # curl's own --limit-rate before ours: 20 MiB/s, light on a 2-core VM
SHOTS_ENV = "CHADTHROTTLE_GUI_SHOTS"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Atspi(LineProgram):
    def do(self, *cmd: object, timeout: float = 60.0, applet: Applet | None = None):
        self.send(*cmd)
        answer = self.read(timeout)
        log = f"\n--- applet output ---\n{applet.output()[-3000:]}" if applet else ""
        assert answer is not None, f"the AT-SPI driver did not answer {cmd} in time{log}"
        assert answer["ok"], f"{cmd}: {answer['error']}{log}"
        return answer["value"]


def list_limits(address: str) -> list[tuple[int, int, int]]:
    r = dbus_helpers.dbus_send(address, "ListLimits")
    assert r.ok, r
    nums = [int(n) for n in re.findall(r"(?:uint32|uint64) (\d+)", r.text)]
    return [tuple(nums[i:i + 3]) for i in range(0, len(nums), 3)]


def stat(address: str, pid: int, key: str) -> float:
    r = dbus_helpers.dbus_send(address, "GetStats", f"uint32:{pid}")
    assert r.ok, r
    m = re.search(r'string "' + re.escape(key) + r'"\s+variant\s+\w+ ([\d.e+-]+)', r.text)
    assert m, f"GetStats has no {key}: {r.text}"
    return float(m.group(1))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_applet_limits_a_running_curl_through_the_editor(gui_deps, private_bus, tmp_path):
    shots = tmp_path / "shots"
    shots.mkdir()
    desktop = Desktop().start()
    applet = daemon = driver = None
    try:
        # the daemon is not running yet: the applet says so, and how to start it
        applet = Applet(desktop, private_bus, tmp_path / "applet.log", shots)
        driver = Atspi(DRIVER, desktop.env)
        assert driver.do("wait_app", applet=applet) == "chadthrottle"
        driver.do("wait_name", "The chadthrottle daemon is not running", applet=applet)
        driver.do("wait_name", "sudo systemctl start chadthrottled", applet=applet)
        driver.do("shot", "applet-no-daemon", applet=applet)

        # the daemon comes: the applet follows without a restart
        daemon = dbus_helpers.start_daemon(private_bus, tmp_path / "chadthrottled.log",
                                           "--monitor-all")
        with HttpServer() as srv, \
                Transfer(["curl", "-sS", "--limit-rate", CURL_OWN_CAP, "--max-time", "120",
                          "-o", "-", srv.url(1 << 40)], max_seconds=120) as curl, \
                Transfer(paced_download(srv.url(1 << 40), 3_000_000, 120), max_seconds=120):
            driver.do("expand", "curl", applet=applet)
            row = driver.do("wait_name", f"curl (PID {curl.pid})", applet=applet)
            assert row == f"curl (PID {curl.pid})"
            # a few seconds of unlimited history in the sparklines (more for the README's)
            time.sleep(20 if os.environ.get(SHOTS_ENV) else 4)

            # click the curl row's limit button, pick the 1 MiB/s preset, apply
            title = driver.do("open_editor", curl.pid, applet=applet)
            assert title == f"Limit curl (PID {curl.pid})"
            # a rate the CLI refuses is refused here too, with its words
            driver.do("type", "Download limit rate", "10Mb", applet=applet)
            driver.do("wait_name", "'10Mb' is ambiguous", applet=applet)
            assert driver.do("sensitive", "Apply", applet=applet) is False
            driver.do("click", "Download 1 MiB/s", applet=applet)
            assert driver.do("entry_text", "Download limit rate", "1 MiB/s",
                             applet=applet) == "1 MiB/s"
            assert driver.do("entry_text", "Upload limit rate", applet=applet) == "unlimited"
            driver.do("shot", "applet-editor", applet=applet)
            driver.do("click", "Apply", applet=applet)
            driver.do("wait_window_gone", "Limit curl", applet=applet)

            # over the bus: the limit is in force ...
            assert (curl.pid, MiB, 0) in list_limits(private_bus)
            assert stat(private_bus, curl.pid, "download_limit") == MiB
            # ... and the window shows it
            texts = driver.do("wait_row_text", curl.pid, "↓ 1 MiB/s", applet=applet)
            assert any("↓ 1 MiB/s" in t for t in texts), texts

            # curl's rate falls to about 1 MiB/s: the daemon's figure and curl's own output
            time.sleep(5)
            rates = []
            for _ in range(5):
                rates.append(stat(private_bus, curl.pid, "download_rate"))
                time.sleep(1)
            t = time.monotonic() - curl.t0
            measured = curl.rate(t - 5, t)
            assert 0.5 * MiB <= statistics.median(rates) <= 1.5 * MiB, rates
            assert 0.5 * MiB <= measured <= 1.5 * MiB, measured

            driver.do("shot", "applet-main", applet=applet)
            driver.do("click", "Limits and Rules", applet=applet)
            driver.do("wait_name", f"Limit of curl (PID {curl.pid})", applet=applet)
            driver.do("shot", "applet-limits", applet=applet)
            # removed from the Limits tab: gone over the bus too
            driver.do("click", f"Remove the limit of curl (PID {curl.pid})", applet=applet)
            driver.do("wait_name", "No process is limited", applet=applet)
            assert all(pid != curl.pid for pid, _, _ in list_limits(private_bus))
            assert applet.alive(), applet.output()[-3000:]
    finally:
        if driver is not None:
            driver.close()
        if applet is not None:
            applet.stop()
        if daemon is not None:
            rc = daemon.stop()
            assert rc == 0, daemon.log()[-3000:]
        desktop.stop()

    for name in ("applet-no-daemon", "applet-editor", "applet-main", "applet-limits"):
        w, h = png_size(shots / f"{name}.png")
        assert w >= 400 and h >= 200, (name, w, h)
    if os.environ.get(SHOTS_ENV):
        dest = Path(os.environ[SHOTS_ENV])
        dest.mkdir(parents=True, exist_ok=True)
        for png in shots.glob("*.png"):
            shutil.copyfile(png, dest / png.name)


def activate_action(desktop: Desktop, action: str) -> None:
    """Activate one of the applet's actions, as its menu does, over the session bus."""
    p = subprocess.run(["gdbus", "call", "--session", "--dest", "org.chadthrottle.Gui",
                        "--object-path", "/org/chadthrottle/Gui", "--method",
                        "org.gtk.Actions.Activate", action, "[]", "{}"],
                       env=desktop.env, capture_output=True, text=True, timeout=15)
    assert p.returncode == 0, p.stderr


def test_notifications_are_off_by_default_then_tell_of_others_changes_and_exits(
        gui_deps, private_bus, tmp_path, sleeper):
    desktop = Desktop().start()
    applet = daemon = monitor = None
    try:
        daemon = dbus_helpers.start_daemon(private_bus, tmp_path / "chadthrottled.log")
        applet = Applet(desktop, private_bus, tmp_path / "applet.log")
        # what the applet sends to the desktop's notification server
        monitor = subprocess.Popen(
            ["dbus-monitor", "--session",
             "type='method_call',interface='org.freedesktop.Notifications',member='Notify'"],
            env=desktop.env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.monotonic() + 30
        while subprocess.run(["dbus-send", "--session", "--print-reply",
                              "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                              "org.freedesktop.DBus.NameHasOwner", "string:org.chadthrottle.Gui"],
                             env=desktop.env, capture_output=True, text=True
                             ).stdout.find("true") < 0:
            assert time.monotonic() < deadline and applet.alive(), applet.output()[-3000:]
            time.sleep(0.2)
        time.sleep(2)  # the applet has found the daemon

        quiet, loud = sleeper(), sleeper()
        # off by default: someone else's limit is not told
        r = dbus_helpers.dbus_send(private_bus, "SetLimit", f"uint32:{quiet.pid}",
                                   "uint64:65536", "uint64:0")
        assert r.ok, r
        time.sleep(1)
        activate_action(desktop, "notifications")
        prefs = Path(desktop.env["XDG_CONFIG_HOME"]) / "chadthrottle" / "gui.json"
        assert '"notifications": true' in prefs.read_text()
        r = dbus_helpers.dbus_send(private_bus, "SetLimit", f"uint32:{loud.pid}",
                                   "uint64:65536", "uint64:0")
        assert r.ok, r
        time.sleep(1)
        dbus_helpers.stop_pid(loud)  # LimitRemoved(pid, "exited")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if not dbus_helpers.dbus_send(private_bus, "ListLimits").text.count(str(loud.pid)):
                break
        time.sleep(1)
        assert applet.alive(), applet.output()[-3000:]
    finally:
        if monitor is not None:
            monitor.terminate()
            seen = monitor.communicate(timeout=10)[0]
        if applet is not None:
            applet.stop()
        if daemon is not None:
            daemon.stop()
        desktop.stop()
    assert f"Someone else limited PID {loud.pid} (sleep)" in seen, seen
    assert "A limited process ended" in seen, seen
    assert f"PID {loud.pid} (sleep) ended" in seen, seen
    assert f"PID {quiet.pid}" not in seen, seen


SNI_HOST = Path(__file__).with_name("sni_host.py")


class Host(LineProgram):
    def next(self, event: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            e = self.read(max(0.0, deadline - time.monotonic()))
            assert e is not None, f"no {event} from the tray host"
            assert e["event"] != "error", e
            if e["event"] == event:
                return e


def test_tray_icon_shows_rates_and_toggles_the_window(gui_deps, private_bus, tmp_path):
    desktop = Desktop().start()
    applet = daemon = driver = host = None
    try:
        host = Host(SNI_HOST, desktop.env)
        host.next("watching")
        applet = Applet(desktop, private_bus, tmp_path / "applet.log")
        registered = host.next("registered")
        assert registered["service"] == registered["sender"]
        driver = Atspi(DRIVER, desktop.env)
        driver.do("wait_app", applet=applet)
        driver.do("wait_window_shown", "chadthrottle", applet=applet)
        host.send("get", "Status")
        assert host.next("value")["value"] == "Passive"  # no daemon yet
        daemon = dbus_helpers.start_daemon(private_bus, tmp_path / "chadthrottled.log")
        assert host.next("signal")["args"] == ["Active"]
        host.next("signal")  # NewToolTip: the first sample
        host.send("get", "ToolTip")
        icon, _pixmaps, title, tip = host.next("value")["value"]
        assert (icon, title) == ("org.chadthrottle.Gui", "chadthrottle")
        assert tip.startswith("↓ ") and "↑ " in tip, tip

        # a click on the icon hides the window, another shows it
        host.send("activate")
        host.next("activated")
        driver.do("wait_window_shown", "chadthrottle", False, applet=applet)
        host.send("activate")
        host.next("activated")
        driver.do("wait_window_shown", "chadthrottle", applet=applet)
        # with a tray, closing the window hides it; the applet goes on
        driver.do("click", "Close", applet=applet)
        driver.do("wait_window_shown", "chadthrottle", False, applet=applet)
        assert applet.alive()
        host.send("activate")
        host.next("activated")
        driver.do("wait_window_shown", "chadthrottle", applet=applet)
    finally:
        for p in (driver, host):
            if p is not None:
                p.close()
        if applet is not None:
            applet.stop()
        if daemon is not None:
            daemon.stop()
        desktop.stop()
