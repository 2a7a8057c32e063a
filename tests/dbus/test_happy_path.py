"""Issue 3, happy path with a real client (dbus-send) and a real download (curl):
SetLimit on a running curl at 1 MiB/s holds 0.8–1.25×, GetStats says `throttled`,
ClearLimit restores the speed, LimitRemoved(`exited`) arrives when the process ends."""

from __future__ import annotations

import re
import subprocess
import threading
import time

import pytest

from chadthrottle import names
from chadthrottle.bench.traffic import HttpServer, Transfer, curl_download
from conftest import env_with, stop_pid

MIB = 1024 * 1024
LIMIT = 1 * MIB


class Monitor:
    """dbus-monitor (a real client) collecting our signals; stopped by pid."""

    def __init__(self, address: str) -> None:
        self.proc = subprocess.Popen(
            ["dbus-monitor", "--system",
             f"type='signal',sender='{names.BUS_NAME}',interface='{names.INTERFACE}'"],
            env=env_with(address), stdout=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        time.sleep(0.5)  # the match rule is in place

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def signals(self) -> list[tuple]:
        """[(member, arg, arg, ...)]"""
        out: list[tuple] = []
        cur: list | None = None
        for line in list(self.lines):
            m = re.match(r"signal .*member=(\w+)", line)
            if m:
                cur = [m.group(1)]
                out.append(cur)  # type: ignore[arg-type]
                continue
            m = re.match(r'\s+(?:uint32|uint64) (\d+)|\s+string "(.*)"', line)
            if m and cur is not None:
                cur.append(int(m.group(1)) if m.group(1) else m.group(2))
        return [tuple(s) for s in out]

    def wait_for(self, sig: tuple, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sig in self.signals():
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        stop_pid(self.proc)


def stat_value(reply_text: str, key: str):
    """Value of one key in a dbus-send print-reply of a{sv}."""
    m = re.search(r'string "' + re.escape(key) + r'"\s+variant\s+\w+ ("?)(.*?)\1\s*\)',
                  reply_text, re.S)
    assert m, (key, reply_text)
    return m.group(2)


@pytest.mark.slow
def test_limit_running_curl_download_then_clear_then_exit(daemon):
    mon = Monitor(daemon.address)
    try:
        with HttpServer() as srv:
            with Transfer(curl_download(srv.url(1 << 40), 40), max_seconds=40) as tr:
                time.sleep(1.0)  # a running download with an open socket
                assert tr.total > 0, "curl did not start downloading"
                t_set = time.monotonic() - tr.t0
                r = daemon.call("SetLimit", f"uint32:{tr.pid}", f"uint64:{LIMIT}", "uint64:0")
                assert r.ok, r
                time.sleep(8.5)
                limited = tr.rate(t_set + 2, t_set + 8)
                ratio = limited / LIMIT
                stats = daemon.call("GetStats", f"uint32:{tr.pid}")
                assert stats.ok, stats
                status = stat_value(stats.text, "status")
                limits = daemon.call("ListLimits")
                assert f"uint32 {tr.pid}" in limits.text and f"uint64 {LIMIT}" in limits.text

                r = daemon.call("ClearLimit", f"uint32:{tr.pid}")
                assert r.ok, r
                t_clear = time.monotonic() - tr.t0
                time.sleep(6.0)
                # per-second rates after the clear: TCP may sit out one (backed-off) RTO
                after = [tr.rate(t_clear + a, t_clear + a + 1) for a in range(6)]
                restored = max(after)

                # limit again, then end the process: LimitRemoved(pid, "exited")
                assert daemon.call("SetLimit", f"uint32:{tr.pid}", f"uint64:{LIMIT}",
                                   "uint64:0").ok
                time.sleep(0.5)
                tr.stop()
                exited = mon.wait_for(("LimitRemoved", tr.pid, names.REASON_EXITED), 5)
        print(f"1 MiB/s: ratio {ratio:.3f}; after ClearLimit {restored / MIB:.1f} MiB/s; "
              f"status {status}")
        assert 0.8 <= ratio <= 1.25, f"achieved {limited:.0f} B/s for a {LIMIT} B/s limit"
        assert status == names.STATUS_THROTTLED, stats.text
        assert restored > 4 * LIMIT, f"speed not restored after ClearLimit: {after} B/s"
        sigs = mon.signals()
        assert ("LimitChanged", tr.pid, LIMIT, 0) in sigs, sigs
        assert ("LimitRemoved", tr.pid, names.REASON_CLEARED) in sigs, sigs
        assert exited, f"no LimitRemoved(exited) for {tr.pid}: {sigs}"
        assert f"uint32 {tr.pid}" not in daemon.call("ListLimits").text
        assert daemon.alive()
    finally:
        mon.stop()
