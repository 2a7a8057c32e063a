"""--monitor-all: programs at the cgroup2 root from the start, so ListProcesses shows a
process with traffic before any limit exists (the data behind `chadthrottlectl top`)."""

from __future__ import annotations

import os
import time

import pytest

from chadthrottle.bench.traffic import HttpServer, Transfer, paced_download
from conftest import start_daemon

MiB = 1 << 20


@pytest.mark.skipif(os.geteuid() != 0, reason="chadthrottled needs root")
def test_list_processes_sees_unlimited_traffic(system_bus, tmp_path):
    d = start_daemon(system_bus, tmp_path / "daemon.log", "--monitor-all")
    try:
        attached = d.call("Get", f"string:{'org.chadthrottle.Throttle1'}",
                          "string:AttachedCgroups", interface="org.freedesktop.DBus.Properties")
        assert attached.ok and 'string "/"' in attached.text
        with HttpServer() as srv, \
                Transfer(paced_download(srv.url(100 * MiB), 2 * MiB, 4), max_seconds=4) as t:
            time.sleep(3)  # the daemon samples every second; rates need two samples
            reply = d.call("ListProcesses")
            t.stop()
        assert reply.ok, reply
        assert f"uint32 {t.pid}" in reply.text, reply.text[:2000]
        listed = d.call("ListLimits")
        assert listed.ok and "uint32" not in listed.text  # nothing was limited
    finally:
        assert d.stop() == 0, d.log()[-3000:]
