"""Issue 7, the bus gate under attack, with a real unprivileged user (created and removed
here), a real dbus-daemon and a real polkitd:

* 6 — a flood of calls from one user cannot make polkit say "no" to anyone: reads need no
  polkit round trip, calls towards polkit are bounded, a polkit transport error is never a
  denial, and the daemon's log is rate-limited;
* 9 — huge unit names answer NoSuchUnit fast, with no traceback;
* 10 — nobody but root may emit signals of our interface on the bus.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chadthrottle import names
from conftest import (
    ROOT,
    Listener,
    as_user,
    env_with,
    requires_root,
    rules_allowing_own,
    run_polkitd,
    start_daemon,
    stop_pid,
)

pytestmark = requires_root

HERE = Path(__file__).resolve().parent
NOT_AUTHORIZED = names.ERR_NOT_AUTHORIZED


@pytest.fixture
def polkit_own_on_default_bus(default_limits_bus, user, another_user):
    yield from run_polkitd(default_limits_bus, rules_allowing_own(user[0], another_user[0]))


@pytest.fixture
def daemon_on_default_bus(default_limits_bus, tmp_path):
    d = start_daemon(default_limits_bus, tmp_path / "chadthrottled.log")
    try:
        yield d
    finally:
        rc = d.stop()
        assert rc == 0, f"chadthrottled exited {rc} on SIGTERM:\n{d.log()[-4000:]}"


def _warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]


def _flood_proc(address: str, uid: int, gid: int, own: int, other: int,
                *args: str) -> subprocess.Popen:
    return subprocess.Popen([*as_user(uid, gid), sys.executable, str(HERE / "flood_client.py"),
                             address, str(own), str(other), *args],
                            env=env_with(address), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        stop_pid(proc)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


def _flood(address: str, uid: int, gid: int, own: int, other: int, *args: str) -> dict:
    return _result(_flood_proc(address, uid, gid, own, other, *args))


# --------------------------------------------------------------------------- 6. polkit flood
def test_issue7_polkit_flood_reads_never_denied_and_own_limit_never_denied(
        polkit_own_on_default_bus, daemon_on_default_bus, user, sleeper):
    """On a bus with the distribution's default limits, one user keeps ~2,000 reads in
    flight over 16 connections while making 18 legitimate SetLimit calls on their own
    process: every read succeeds, no SetLimit is denied, and the log stays quiet."""
    d = daemon_on_default_bus
    _, uid, gid = user
    own = sleeper(uid, gid)
    other = sleeper()
    r = _flood(d.address, uid, gid, own.pid, other.pid,
               "--connections", "16", "--reads", "125", "--own-calls", "18")
    print("flood:", r)
    assert r["reads"] == {"ok": 2000}, r
    assert r["own"] == {"ok": 18}, r
    warnings = _warnings(d.log())
    assert len(warnings) <= 10, "\n".join(warnings[:40])


def test_issue7_polkit_flood_of_denied_changes_does_not_deny_others(
        polkit_own_on_default_bus, daemon_on_default_bus, user, another_user, sleeper):
    """One user floods polkit with 480 SetLimit calls on root's process (each one a real
    polkit round trip that must end in "no") over 4 connections — far more than the 128
    calls the daemon's own connection may have pending — while making 18 legitimate
    SetLimit calls on their own process; meanwhile another user limits their own process.
    Polkit is never asked more than the gate's bound at once, so it answers every call:
    the hostile ones are NotAuthorized (polkit said no), every legitimate one succeeds,
    the other user is not queued behind the flood (the flooder's own calls are), and
    denials are logged rate-limited."""
    d = daemon_on_default_bus
    _, uid, gid = user
    _, uid2, gid2 = another_user
    own = sleeper(uid, gid)
    own2 = sleeper(uid2, gid2)
    other = sleeper()
    flood = _flood_proc(d.address, uid, gid, own.pid, other.pid,
                        "--connections", "2", "--reads", "100",
                        "--hostile-connections", "4", "--hostile", "120", "--own-calls", "18")
    bystander = _flood_proc(d.address, uid2, gid2, own2.pid, other.pid,
                            "--connections", "0", "--own-calls", "10", "--pause", "0.2")
    r, r2 = _result(flood), _result(bystander)
    print("flood:", r)
    print("other user:", r2)
    assert r["reads"] == {"ok": 200}, r
    assert r["own"] == {"ok": 18}, r
    assert r["hostile"] == {NOT_AUTHORIZED: 4 * 120}, r
    assert r2["own"] == {"ok": 10}, r2
    # the flooder's own calls wait behind their flood; the other user's do not
    assert r2["own_max_seconds"] < r["own_max_seconds"] / 2, (r2, r)
    assert f"uint32 {other.pid}" not in d.call("ListLimits").text
    log = d.log()
    warnings = _warnings(log)
    assert len(warnings) <= 10, "\n".join(warnings[:40])
    denials = [line for line in log.splitlines() if "denied" in line]
    assert 1 <= len(denials) <= 20, "\n".join(denials[:40])
    assert "Traceback" not in log, log[-4000:]


@pytest.mark.slow
def test_issue7_polkit_flood_unanswered_polkit_is_failed_not_denied(
        polkit_own_on_default_bus, daemon_on_default_bus, user, sleeper):
    """A polkit that does not answer (stopped here with SIGSTOP, as a polkit drowning in
    requests would be) makes the call fail with Failed after the gate's timeout — it is
    not a denial; once polkit answers again, the same call succeeds."""
    d = daemon_on_default_bus
    _, uid, gid = user
    own = sleeper(uid, gid)
    polkitd = polkit_own_on_default_bus
    os.kill(polkitd.pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        r = d.call("SetLimit", f"uint32:{own.pid}", "uint64:51200", "uint64:0",
                   uid=uid, gid=gid)
        waited = time.monotonic() - t
    finally:
        os.kill(polkitd.pid, signal.SIGCONT)
    assert r.error == names.ERR_FAILED, r
    assert "try again" in r.text, r
    assert waited < 20, waited
    assert d.call("SetLimit", f"uint32:{own.pid}", "uint64:51200", "uint64:0",
                  uid=uid, gid=gid).ok
    assert f"uint32 {own.pid}" in d.call("ListLimits").text


# --------------------------------------------------------------------------- 9. huge names
HUGE_NAMES_CLIENT = """
import asyncio, json, sys, time
from dbus_fast import Message
from dbus_fast.aio import MessageBus

async def main(address, bus_name, path, iface):
    bus = await MessageBus(bus_address=address).connect()
    out = []
    for member, sig, extra in (("SetUnitLimit", "stt", [51200, 0]),
                               ("ClearUnitLimit", "s", [])):
        for shape in ("a/", "x", "../", "./"):
            for size in (40_000, 80_000, 160_000):
                name = (shape * (size // len(shape)))[:size]
                t = time.monotonic()
                r = await asyncio.wait_for(bus.call(Message(
                    destination=bus_name, path=path, interface=iface, member=member,
                    signature=sig, body=[name, *extra])), 60)
                out.append([member, shape, size, round(time.monotonic() - t, 4),
                            r.error_name, len(r.body[0]) if r.body else 0])
    print(json.dumps(out))

asyncio.run(main(*sys.argv[1:]))
"""


def _huge_names(address: str, prefix: list[str]) -> list:
    p = subprocess.run([*prefix, sys.executable, "-c", HUGE_NAMES_CLIENT, address,
                        names.BUS_NAME, names.OBJECT_PATH, names.INTERFACE],
                       env=env_with(address), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def test_issue7_huge_unit_names_answer_no_such_unit_fast(
        polkit_own_on_default_bus, daemon_on_default_bus, user):
    """40k, 80k and 160k-character unit names (many components, one huge component, '..'
    chains, '.' chains) get NoSuchUnit in well under a second each, from root (through the
    cgroup resolution) and from a user (before polkit is even asked), with a short message
    and no traceback in the log."""
    d = daemon_on_default_bus
    _, uid, gid = user
    for who, prefix in (("root", []), ("user", as_user(uid, gid))):
        rows = _huge_names(d.address, prefix)
        print(who, "slowest:", max(rows, key=lambda r: r[3]))
        for member, shape, size, seconds, error, text_len in rows:
            assert error == names.ERR_NO_SUCH_UNIT, (who, member, shape, size, error)
            assert seconds < 1.0, (who, member, shape, size, seconds)
            assert text_len < 400, (who, member, shape, size, text_len)
    log = d.log()
    assert "Traceback" not in log, log[-4000:]
    assert d.alive()


# --------------------------------------------------------------------------- 10. signals
def _emit(address: str, prefix: list[str], path: str, member: str, *args: str):
    return subprocess.run([*prefix, "dbus-send", "--system", "--type=signal", path, member,
                           *args], env=env_with(address), capture_output=True, text=True,
                          timeout=10)


def test_issue7_forged_signals_are_refused_by_the_bus(daemon, user, sleeper):
    """An unprivileged user cannot emit LimitRemoved/LimitChanged (our interface) nor
    PropertiesChanged for our object: a root listener whose match rules would accept them
    from anyone never receives them, while root's own signals and the daemon's arrive."""
    _, uid, gid = user
    listener = Listener(
        daemon.address,
        f"type='signal',interface='{names.INTERFACE}'",
        f"type='signal',interface='org.freedesktop.DBus.Properties',path='{names.OBJECT_PATH}'")
    try:
        forged = [
            (names.OBJECT_PATH, f"{names.INTERFACE}.LimitRemoved", "uint32:4242",
             "string:cleared"),
            ("/", f"{names.INTERFACE}.LimitRemoved", "uint32:4243", "string:exited"),
            (names.OBJECT_PATH, f"{names.INTERFACE}.LimitChanged", "uint32:4244",
             "uint64:1024", "uint64:0"),
            (names.OBJECT_PATH, "org.freedesktop.DBus.Properties.PropertiesChanged",
             f"string:{names.INTERFACE}", "dict:string:string:Version,forged",
             "array:string:"),
        ]
        for path, member, *args in forged:
            r = _emit(daemon.address, as_user(uid, gid), path, member, *args)
            print("forged", member, "->", r.returncode, r.stderr.strip())
        # the control: root's signal of the same kind is delivered (the listener works)
        assert _emit(daemon.address, [], names.OBJECT_PATH, f"{names.INTERFACE}.LimitRemoved",
                     "uint32:4245", "string:cleared").returncode == 0
        assert listener.wait_for(lambda s: s["body"] == [4245, "cleared"], 5), listener.lines
        # and the daemon's own
        p = sleeper()
        assert daemon.call("SetLimit", f"uint32:{p.pid}", "uint64:51200", "uint64:0").ok
        assert listener.wait_for(lambda s: s["member"] == "LimitChanged"
                                 and s["body"][0] == p.pid, 5), listener.lines
        assert daemon.call("ClearLimit", f"uint32:{p.pid}").ok
        assert listener.wait_for(lambda s: s["body"] == [p.pid, "cleared"], 5), listener.lines
        got = listener.signals()
    finally:
        listener.stop()
    bodies = [s["body"] for s in got]
    assert not any(b and b[0] in (4242, 4243, 4244) for b in bodies), got
    assert not any(s["member"] == "PropertiesChanged" and "Version" in s["body"][1]
                   for s in got), got


def test_issue7_forged_signals_readme_monitor_line_matches_the_sender(daemon, sleeper):
    """The README's dbus-monitor line (sender='org.chadthrottle.Throttle1') shows the
    daemon's signals, and a match rule with that sender= does not take signals from
    another connection (here root's, which the bus policy allows to send them)."""
    readme = (ROOT / "README.md").read_text()
    m = re.search(r'dbus-monitor --system "([^"]+)"', readme)
    assert m, "README has no dbus-monitor line"
    rule = m.group(1)
    assert f"sender='{names.BUS_NAME}'" in rule, rule
    listener = Listener(daemon.address, rule)
    try:
        assert _emit(daemon.address, [], names.OBJECT_PATH, f"{names.INTERFACE}.LimitRemoved",
                     "uint32:4246", "string:cleared").returncode == 0
        p = sleeper()
        assert daemon.call("SetLimit", f"uint32:{p.pid}", "uint64:51200", "uint64:0").ok
        assert daemon.call("ClearLimit", f"uint32:{p.pid}").ok
        assert listener.wait_for(lambda s: s["body"] == [p.pid, "cleared"], 5), listener.lines
        got = listener.signals()
    finally:
        listener.stop()
    assert not any(s["body"] and s["body"][0] == 4246 for s in got), got
