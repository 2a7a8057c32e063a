"""`make run` (devrun) on a machine without a system bus, and the daemon confined to the
unit's CapabilityBoundingSet (the capabilities the unit claims are enough, really are)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from chadthrottle.bench.traffic import HttpServer, Transfer, curl_download
from conftest import ROOT, dbus_send, requires_bpf_object, requires_root, start_daemon

pytestmark = [requires_root, requires_bpf_object]


def test_devrun_starts_a_private_bus_prints_the_export_and_cleans_up():
    bus_dir = Path(tempfile.mkdtemp(prefix="chadthrottle-devrun-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "daemon"))
    env.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
    p = subprocess.Popen([sys.executable, "-m", "chadthrottle.server.devrun", "--private-bus",
                          "--bus-dir", str(bus_dir)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = p.stdout.readline().strip()
        m = re.fullmatch(r"export DBUS_SYSTEM_BUS_ADDRESS=(unix:path=\S+)", line)
        assert m, line
        address = m.group(1)
        deadline = time.monotonic() + 20
        while True:
            r = dbus_send(address, "ListLimits")
            if r.ok:
                break
            assert p.poll() is None and time.monotonic() < deadline, r
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 0
        assert not bus_dir.exists(), "private bus directory left behind"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # its own session: devrun, bus and daemon
            p.wait()
        subprocess.run(["rm", "-rf", str(bus_dir)], check=False)


def _unit_caps() -> list[str]:
    text = (ROOT / "packaging" / "chadthrottled.service").read_text()
    m = re.search(r"^CapabilityBoundingSet=(.*)$", text, re.M)
    assert m
    return [c.strip().lower().removeprefix("cap_") for c in m.group(1).split()]


@pytest.mark.slow
def test_daemon_works_with_only_the_units_capabilities(system_bus, tmp_path):
    caps = ",".join("+" + c for c in _unit_caps())
    prefix = ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all", "--"]
    d = start_daemon(system_bus, tmp_path / "d.log", prefix=prefix)
    try:
        status = Path(f"/proc/{d.pid}/status").read_text()
        eff = int(re.search(r"CapEff:\s*([0-9a-f]+)", status).group(1), 16)
        assert eff != 0 and eff & (1 << 21) == 0, "CAP_SYS_ADMIN must not be in the set"
        limit = 512 * 1024
        with HttpServer() as srv, Transfer(curl_download(srv.url(1 << 40), 12),
                                           max_seconds=12) as tr:
            time.sleep(0.5)
            r = dbus_send(system_bus, "SetLimit", f"uint32:{tr.pid}", f"uint64:{limit}",
                          "uint64:0")
            assert r.ok, (r, d.log()[-2000:])
            t = time.monotonic() - tr.t0
            time.sleep(6)
            ratio = tr.rate(t + 2, t + 6) / limit
        assert 0.7 <= ratio <= 1.3, ratio
        assert dbus_send(system_bus, "GetStats", f"uint32:{os.getpid()}").ok
    finally:
        rc = d.stop()
    assert rc == 0, d.log()[-3000:]
    assert "Traceback" not in d.log()
