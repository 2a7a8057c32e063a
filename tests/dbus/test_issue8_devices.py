"""Issue 8: what the daemon adds to network devices it owns: a start after a crash removes
what the crashed run left, so nothing keeps limiting traffic (the real daemon, a real
SIGKILL, a real device in a namespace of its own)."""

from __future__ import annotations

import subprocess
import time

from chadthrottle import names
from chadthrottle.bench.netns import HomeLink, inside
from chadthrottle.bench.traffic import HttpServer, Transfer, curl_download
from conftest import dbus_send, env_with, requires_root, start_daemon, stop_pid

pytestmark = requires_root
MiB = 1 << 20


def test_sigkill_leaves_nothing_that_limits_once_the_daemon_is_back(system_bus, tmp_path):
    """The daemon installs a queue on a device, is killed with SIGKILL (its qdisc and ifb
    stay behind, fail-closed for the limited socket only); started again, it removes them
    first: the same download then runs at the link's own pace."""
    with HomeLink(8 * MiB) as link:
        with HttpServer(link.far_ip, prefix=["ip", "netns", "exec", link.far]) as srv:
            url = srv.url(1 << 40)
            prefix = ["nsenter", f"--net={link.near_path}"]
            env = env_with(system_bus, CHADTHROTTLE_STATE_DIR=str(tmp_path / "state"),
                           CHADTHROTTLE_CONFIG_DIR=str(tmp_path / "etc"))
            d = start_daemon(system_bus, tmp_path / "d1.log", prefix=prefix, env=env)
            try:
                with inside(link.near_path):
                    t = Transfer(curl_download(url, 4), max_seconds=4, start_paused=True)
                    with t:
                        assert dbus_send(system_bus, "SetLimit", f"uint32:{t.pid}",
                                         f"uint64:{MiB}", "uint64:0").ok
                        t.release()
                        time.sleep(3)
                        qd = subprocess.run(["tc", "qdisc", "show", "dev", link.near_dev],
                                            capture_output=True, text=True).stdout
                        links = subprocess.run(["ip", "-o", "link"], capture_output=True,
                                               text=True).stdout
                        assert "clsact" in qd and names.IFB_PREFIX in links, (qd, links)
                        d.proc.kill()  # SIGKILL: nothing is cleaned up by the daemon
                        d.proc.wait()
                        t.stop()
            finally:
                stop_pid(d.proc)
            d = start_daemon(system_bus, tmp_path / "d2.log", prefix=prefix, env=env)
            try:
                with inside(link.near_path):
                    qd = subprocess.run(["tc", "qdisc", "show", "dev", link.near_dev],
                                        capture_output=True, text=True).stdout
                    links = subprocess.run(["ip", "-o", "link"], capture_output=True,
                                           text=True).stdout
                    assert "clsact" not in qd and names.IFB_PREFIX not in links, (qd, links)
                    with Transfer(curl_download(url, 4), max_seconds=4) as free:
                        time.sleep(4)
                        free.stop()
                    rate = free.rate(1, 4)
                assert rate > 4 * MiB, f"after the restart only {rate / MiB:.1f} MiB/s"
                assert "removed" in d.log(), d.log()[-2000:]
            finally:
                assert d.stop() == 0
