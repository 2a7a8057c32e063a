"""Issue 7: names that are not UTF-8.  Any user chooses the bytes of its process name
(prctl(PR_SET_NAME)), of the path it runs a program from and of a cgroup it may create; a
D-Bus string must be UTF-8.  A process whose name, program path and cgroup are
``\\xff\\xfe`` bytes is seen, limited, listed and scraped like any other (the bad bytes
shown as U+FFFD), and the daemon keeps answering everyone else."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time

import pytest

from chadthrottle import cgroups, names
from chadthrottle.bench.traffic import HttpServer
from conftest import env_with, requires_root, stop_pid

pytestmark = requires_root
MIB = 1 << 20
BAD = b"\xff\xfe"

PYNAMED = """
import ctypes, sys, urllib.request
ctypes.CDLL(None).prctl(15, b"bad\\xff\\xfename", 0, 0, 0)  # PR_SET_NAME
print("ready", flush=True)
while True:
    with urllib.request.urlopen(sys.argv[1]) as r:
        while r.read(65536):
            pass
"""


@pytest.fixture
def bad_places():
    """A directory and a cgroup whose names hold bytes that are not UTF-8; removed after."""
    tag = secrets.token_hex(3).encode()
    d = b"/tmp/ct-bytes-" + BAD + tag
    os.mkdir(d)
    root = bytes(cgroups.cgroup2_mount())
    cg = root + b"/ct-bytes-" + BAD + tag
    os.mkdir(cg)
    try:
        yield d, cg
    finally:
        for _ in range(50):
            try:
                with open(cg + b"/cgroup.procs", "rb") as f:
                    for p in f.read().split():
                        with open(root + b"/cgroup.procs", "wb") as back:
                            back.write(p)
                os.rmdir(cg)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        shutil.rmtree(d, ignore_errors=True)


def _ctl(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chadthrottle.cli", *args],
                          env={**env_with(address), "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def _busctl(address: str, method: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["busctl", f"--address={address}", "--json=short", "call",
                           names.BUS_NAME, names.OBJECT_PATH, names.INTERFACE, method, *args],
                          capture_output=True, text=True, timeout=30)


def test_issue7_names_that_are_not_utf8(daemon, bad_places):
    d, cg = bad_places
    curl = d + b"/curl"
    shutil.copy("/usr/bin/curl", curl)
    addr = daemon.address
    with HttpServer() as srv:
        url = srv.url(1 << 40)
        named = subprocess.Popen([sys.executable, "-c", PYNAMED, url], stdout=subprocess.PIPE)
        pathed = subprocess.Popen([curl, "-s", "-o", "/dev/null", "--max-time", "30", url])
        try:
            assert named.stdout.readline().strip() == b"ready"
            with open(f"/proc/{named.pid}/comm", "rb") as f:
                assert f.read().rstrip(b"\n") == b"bad" + BAD + b"name"
            with open(cg + b"/cgroup.procs", "wb") as f:
                f.write(str(pathed.pid).encode())
            assert os.readlink(f"/proc/{pathed.pid}/exe".encode()) == curl
            for p in (named, pathed):
                r = _ctl(addr, "limit", str(p.pid), "-d", "1MiB")
                assert r.returncode == 0, r.stderr
            time.sleep(3.5)  # traffic in the daemon's window, rates from two samples

            st = {p.pid: json.loads(_ctl(addr, "stats", "--json", str(p.pid)).stdout)
                  for p in (named, pathed)}
            assert st[named.pid]["comm"] == "bad\ufffd\ufffdname", st
            assert "\ufffd\ufffd" in st[pathed.pid]["exe"], st
            assert "\ufffd\ufffd" in st[pathed.pid]["cgroup"], st
            listed = json.loads(_ctl(addr, "list", "--json").stdout)
            assert {row["pid"] for row in listed} >= {named.pid, pathed.pid}, listed
            top = json.loads(_ctl(addr, "top", "--json").stdout)
            assert {named.pid, pathed.pid} <= {row["pid"] for row in top}, top
            for method, args in (("ListProcesses", ()), ("ListLimits", ()),
                                 ("GetStats", ("u", str(named.pid))),
                                 ("GetStats", ("u", str(pathed.pid)))):
                r = _busctl(addr, method, *args)
                assert r.returncode == 0, (method, r.stderr)
            assert _ctl(addr, "info").returncode == 0
            # the daemon still answers everyone
            assert daemon.proc.poll() is None
            assert _ctl(addr, "list").returncode == 0
        finally:
            stop_pid(named)
            stop_pid(pathed)
    assert "Traceback" not in daemon.log(), daemon.log()[-3000:]
