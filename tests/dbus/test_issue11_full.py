"""Issue 11, item 4: what happens when the kernel's maps fill up (the README's "Limits"
says the same).

* The limits map (room for ``max_limits`` budgets; 16 here, 16,384 by default): SetLimit
  past it is refused with ``Unsupported`` naming the room and the setting, nothing changes;
  a process a rule matches at exec runs unlimited (an exec cannot be held back), the journal
  says which rule and which process, GetStats says ``unlimited`` with no rule; when a limit
  ends, the process gets its rule's limit.
* A fork storm inside a limited process: membership is task storage (one entry per process,
  no fixed size), so all of the storm is in the budget and nothing is reported full.

Real daemon, real bus, real processes; everything is bounded and stopped by pid."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from chadthrottle import names
from conftest import dbus_send, requires_root, start_daemon, stop_pid

pytestmark = requires_root
ROOM = 16
LIMIT = 51200


def _stats(address: str, pid: int) -> dict[str, str]:
    r = dbus_send(address, "GetStats", f"uint32:{pid}")
    assert r.ok, r
    keys = re.findall(r'string "(\w+)"\s+variant\s+\w+ "?([^"\n]*)"?', r.text)
    return dict(keys)


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (v := pred()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return v


@pytest.fixture
def small(system_bus, tmp_path):
    d = start_daemon(system_bus, tmp_path / "d.log", "--max-limits", str(ROOM))
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log()[-3000:]


def test_issue11_limits_map_full(small, tmp_path):
    addr = small.address
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(ROOM):
            procs.append(subprocess.Popen(["sleep", "120"]))
            assert dbus_send(addr, "SetLimit", f"uint32:{procs[-1].pid}", f"uint64:{LIMIT}",
                             "uint64:0").ok
        extra = subprocess.Popen(["sleep", "120"])
        procs.append(extra)
        r = dbus_send(addr, "SetLimit", f"uint32:{extra.pid}", f"uint64:{LIMIT}", "uint64:0")
        assert not r.ok and r.error == names.ERROR_PREFIX + "Unsupported", r
        assert f"at most {ROOM}" in r.text and "max_limits" in r.text, r.text
        assert str(extra.pid) not in dbus_send(addr, "ListLimits").text

        # a rule matches a new process: no room, it runs unlimited, the journal says so
        app = tmp_path / "ct11-app"
        shutil.copy("/bin/sleep", app)
        r = subprocess.run(["busctl", f"--address={addr}", "call", names.BUS_NAME,
                            names.OBJECT_PATH, names.INTERFACE, "AddRule", "a{sv}", "2",
                            "exe", "s", str(app), "download", "t", str(LIMIT)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        late = subprocess.Popen([str(app), "120"])
        procs.append(late)
        _wait(lambda: f"matched PID {late.pid}" in small.log(), 10, "the no-room line")
        line = next(ln for ln in small.log().splitlines() if f"matched PID {late.pid}" in ln)
        assert f"at most {ROOM}" in line and "runs unlimited" in line, line
        st = _stats(addr, late.pid)
        assert (st["status"], st["rule"], st["download_limit"]) == ("unlimited", "", "0"), st

        # a limit ends: the denied process gets its rule's limit
        assert dbus_send(addr, "ClearLimit", f"uint32:{procs[0].pid}").ok
        st = _wait(lambda: (s := _stats(addr, late.pid))["rule"] and s, 10, "the rule's limit")
        assert st["download_limit"] == str(LIMIT), st
        assert small.alive()
    finally:
        for p in procs:
            stop_pid(p)


STORM = r"""
import os, sys, time
n = int(sys.argv[1])
r, w = os.pipe()
kids = []
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # until the parent goes
        os._exit(0)
    kids.append(pid)
os.close(r)
print(kids[-1], flush=True)
sys.stdin.readline()
"""


def test_issue11_fork_storm_in_a_limited_process(daemon):
    addr = daemon.address
    n = 3000
    parent = subprocess.Popen([sys.executable, "-c", STORM, str(n)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # limited before it forks: every child joins the budget at fork (the kernel)
        assert dbus_send(addr, "SetLimit", f"uint32:{parent.pid}", f"uint64:{LIMIT}",
                         "uint64:0").ok
        t0 = time.monotonic()
        last = int(parent.stdout.readline())
        took = time.monotonic() - t0
        with open(f"/proc/{parent.pid}/task/{parent.pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
        assert len(kids) == n, len(kids)
        for pid in (kids[0], kids[n // 2], last):
            st = _stats(addr, pid)
            assert st["download_limit"] == str(LIMIT), (pid, st)
        assert "map is full" not in daemon.log() and "no room" not in daemon.log()
        print(f"\n{n} forks in {took:.2f} s, every child in the parent's budget")
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        parent.wait(30)
    # the storm is gone: so is the limit (its last member exited)
    _wait(lambda: str(parent.pid) not in dbus_send(addr, "ListLimits").text, 30,
          "the storm's limit to end")
