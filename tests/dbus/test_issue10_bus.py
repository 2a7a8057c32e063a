"""Issue 10, the bus side for applets (DESIGN §2b), against the real daemon on a private bus
with real clients (busctl, dbus-send, chadthrottlectl, dbus-fast connections), a real
polkitd, a real polkit authentication agent (pkttyagent) and real throwaway users:

* Subscribe / Unsubscribe and the unicast Stats signal: only the subscriber receives it; a
  subscriber killed with SIGKILL is forgotten and the others keep being served; sampling
  runs only while someone needs it;
* GetPermissions for root, for users with and without polkit;
* the Limits property and PropertiesChanged (Limits, AttachedCgroups);
* the allow-interactive-authorization flag reaches polkit (an agent asks for a password);
  a bare call fails fast.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from chadthrottle import names
from chadthrottle.bench.traffic import HttpServer, Transfer, paced_download
from conftest import (
    Listener,
    as_user,
    env_with,
    requires_root,
    rules_allowing_own,
    run_polkitd,
    stop_pid,
)

pytestmark = requires_root

MIB = 1 << 20
STATS_RULE = f"type='signal',interface='{names.INTERFACE}',member='Stats'"
PROPS_RULE = (f"type='signal',sender='{names.BUS_NAME}',path='{names.OBJECT_PATH}',"
              f"interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'")


def busctl(address: str, *args: str, prefix: list[str] | None = None):
    return subprocess.run([*(prefix or []), "busctl", "--system", *args],
                          env=env_with(address), capture_output=True, text=True, timeout=30)


def busctl_json(address: str, *args: str, prefix: list[str] | None = None):
    r = busctl(address, "--json=short", *args, prefix=prefix)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_log(daemon, pattern: str, timeout: float = 10.0, after: int = 0) -> re.Match:
    deadline = time.monotonic() + timeout
    while True:
        m = re.compile(pattern, re.M).search(daemon.log(), after)
        if m:
            return m
        assert time.monotonic() < deadline, f"{pattern!r} not in:\n{daemon.log()[-3000:]}"
        time.sleep(0.1)


def stats_of(listener: Listener) -> list[dict]:
    return [s for s in listener.signals() if s["member"] == "Stats"]


# --------------------------------------------------------------------------- with busctl
def test_issue10_members_with_busctl_and_dbus_send(daemon, sleeper):
    a = daemon.address
    call = ["call", names.BUS_NAME, names.OBJECT_PATH, names.INTERFACE]
    assert busctl(a, *call, "Subscribe", "u", "1000").returncode == 0
    # busctl left the bus at once: its subscription is forgotten
    wait_log(daemon, r"Stats subscriber :\S+ left the bus; 0 subscriber\(s\)")
    assert daemon.call("Unsubscribe").ok  # no subscription: still fine
    assert daemon.call("Subscribe", "string:1000").error == \
        "org.freedesktop.DBus.Error.InvalidArgs"
    perms = busctl_json(a, *call, "GetPermissions")["data"][0]
    assert perms == dict.fromkeys(names.POLKIT_ACTIONS, names.PERMISSION_YES)  # root
    r = daemon.call("GetPermissions")
    assert r.ok and f'string "{names.POLKIT_ACTION_MANAGE_RULES}"' in r.text, r
    p = sleeper()
    assert daemon.call("SetLimit", f"uint32:{p.pid}", "uint64:51200", "uint64:2048").ok
    limits = busctl_json(a, "get-property", names.BUS_NAME, names.OBJECT_PATH,
                         names.INTERFACE, "Limits")
    assert limits == {"type": "a(utt)", "data": [[p.pid, 51200, 2048]]}
    assert daemon.call("ClearLimit", f"uint32:{p.pid}").ok
    assert busctl_json(a, "get-property", names.BUS_NAME, names.OBJECT_PATH,
                       names.INTERFACE, "Limits")["data"] == []


# --------------------------------------------------------------------------- Stats
def _top_on_a_terminal(address: str, interval: str) -> tuple[subprocess.Popen, int]:
    """`chadthrottlectl top` live on a pseudo-terminal: a real subscriber."""
    master, slave = pty.openpty()
    env = {**env_with(address), "TERM": "xterm-256color", "LINES": "30", "COLUMNS": "160"}
    proc = subprocess.Popen([sys.executable, "-m", "chadthrottle.cli", "top", "-i", interval],
                            stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    return proc, master


def _drain(fd: int, seconds: float) -> bytes:
    out = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
    return out


@pytest.mark.slow
def test_issue10_stats_unicast_and_killed_subscribers_are_forgotten(daemon, user):
    _, uid, gid = user
    d = daemon
    wait_log(d, r"sampling off \(0 subscriber")  # idle: nothing needs samples
    top, master = _top_on_a_terminal(d.address, "0.25")
    fast = slow = bystander = None
    try:
        wait_log(d, r"Stats subscriber \S+ \(uid 0\): every 250 ms; 1 subscriber")
        wait_log(d, r"sampling on \(1 subscriber")
        fast = Listener(d.address, STATS_RULE, prefix=as_user(uid, gid), subscribe=1)
        slow = Listener(d.address, STATS_RULE, prefix=as_user(uid, gid), subscribe=1000)
        bystander = Listener(d.address, STATS_RULE, prefix=as_user(uid, gid))
        assert fast.subscribed == "ok" and slow.subscribed == "ok"
        wait_log(d, rf"Stats subscriber {re.escape(fast.unique_name)} \(uid {uid}\): "
                    rf"every 250 ms")  # 1 ms is clamped
        with HttpServer() as srv, \
                Transfer(paced_download(srv.url(100 * MIB), 2 * MIB, 6), max_seconds=8) as t:
            assert d.call("SetLimit", f"uint32:{t.pid}", f"uint64:{MIB}", "uint64:0").ok
            screen = _drain(master, 3.5)
            # the real client drew its table from Stats: the limited download is in it
            assert str(t.pid).encode() in screen, screen[-2000:]
            # SIGKILL: no Unsubscribe, the connection just goes away
            os.kill(top.pid, signal.SIGKILL)
            top.wait(10)
            wait_log(d, r"Stats subscriber :\S+ left the bus; 2 subscriber\(s\)")
            n_fast, n_slow = len(stats_of(fast)), len(stats_of(slow))
            time.sleep(2.2)
            n_running = len(stats_of(fast))  # what came while the download ran
            t.stop()
        assert len(stats_of(fast)) >= n_fast + 6, stats_of(fast)[-3:]
        assert len(stats_of(slow)) >= n_slow + 2
        os.kill(fast.proc.pid, signal.SIGKILL)
        wait_log(d, r"Stats subscriber :\S+ left the bus; 1 subscriber\(s\)")
    finally:
        stop_pid(top)
        os.close(master)
        for x in (fast, slow, bystander):
            if x is not None:
                x.stop()
    # unicast: each Stats went to its subscriber only
    got_fast, got_slow = stats_of(fast), stats_of(slow)
    assert stats_of(bystander) == [], stats_of(bystander)[:2]
    assert all(s["destination"] == fast.unique_name for s in got_fast)
    assert all(s["destination"] == slow.unique_name for s in got_slow)
    owner = got_fast[0]["sender"]
    assert all(s["sender"] == owner and s["path"] == names.OBJECT_PATH
               for s in got_fast + got_slow)
    # the interval: 250 ms (clamped from 1) and 1000 ms
    gaps = [b["t"] - a["t"] for a, b in zip(got_fast, got_fast[1:], strict=False)]
    assert 0.2 <= sorted(gaps)[len(gaps) // 2] <= 0.35, gaps
    gaps = [b["t"] - a["t"] for a, b in zip(got_slow, got_slow[1:], strict=False)]
    assert 0.9 <= sorted(gaps)[len(gaps) // 2] <= 1.2, gaps
    # rows are the ListProcesses rows: the limited download appears with its limit (while
    # it ran: once killed, its limit ends with it and a last row may show it unlimited)
    rows = [r for s in got_fast[:n_running] for r in s["body"][1] if r.get("pid") == t.pid]
    assert rows and rows[-1]["download_limit"] == MIB and rows[-1]["comm"], rows[-1:]
    assert set(rows[-1]) >= {"pid", "comm", "cgroup", "download_rate", "status"}
    assert all(isinstance(s["body"][0], int) and s["body"][0] > 0 for s in got_fast)
    # when the last subscriber and the limit are gone, sampling stops
    assert d.call("ClearLimit", f"uint32:{t.pid}").error in (None, names.ERR_NO_SUCH_LIMIT)
    wait_log(d, r"Stats subscriber :\S+ left the bus; 0 subscriber\(s\)")
    start = d.log().rfind("left the bus; 0 subscriber")
    wait_log(d, r"sampling off \(0 subscriber", timeout=40, after=start)


def test_issue10_subscriptions_per_user_quota(daemon, user):
    _, uid, gid = user
    code = (
        "import asyncio, json, sys\n"
        "from dbus_fast import Message\n"
        "from dbus_fast.aio import MessageBus\n"
        "async def main(address):\n"
        "    buses, out = [], []\n"
        "    for i in range(18):\n"
        "        bus = await MessageBus(bus_address=address).connect()\n"
        "        buses.append(bus)\n"
        f"        r = await bus.call(Message(destination={names.BUS_NAME!r}, "
        f"path={names.OBJECT_PATH!r}, interface={names.INTERFACE!r}, member='Subscribe', "
        "signature='u', body=[10000]))\n"
        "        out.append(r.error_name or 'ok')\n"
        "    buses[0].disconnect()\n"
        "    await asyncio.sleep(0.5)\n"
        f"    r = await buses[-1].call(Message(destination={names.BUS_NAME!r}, "
        f"path={names.OBJECT_PATH!r}, interface={names.INTERFACE!r}, member='Subscribe', "
        "signature='u', body=[10000]))\n"
        "    out.append(r.error_name or 'ok')\n"
        "    print(json.dumps(out))\n"
        "asyncio.run(main(sys.argv[1]))\n")
    p = subprocess.run([*as_user(uid, gid), sys.executable, "-c", code, daemon.address],
                       env=env_with(daemon.address), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out[:16] == ["ok"] * 16
    assert out[16:18] == [names.ERR_LIMITS_EXCEEDED] * 2
    assert out[18] == "ok"  # one left the bus: room again


# --------------------------------------------------------------------------- permissions
def _permissions(address: str, uid: int, gid: int) -> dict:
    r = busctl(address, "--json=short", "call", names.BUS_NAME, names.OBJECT_PATH,
               names.INTERFACE, "GetPermissions", prefix=as_user(uid, gid))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["data"][0]


YES, AUTH, NO = names.PERMISSION_YES, names.PERMISSION_AUTH, names.PERMISSION_NO
OWN, ANY, READ, RULES = names.POLKIT_ACTIONS


def test_issue10_get_permissions_without_polkit(daemon, user):
    _, uid, gid = user
    assert _permissions(daemon.address, uid, gid) == {OWN: NO, ANY: NO, READ: YES, RULES: NO}


@pytest.fixture
def polkit_own(system_bus, user):
    yield from run_polkitd(system_bus, rules_allowing_own(user[0]))


def test_issue10_get_permissions_with_polkit(polkit_own, daemon, user, another_user):
    _, uid, gid = user
    # rules allow limit-own; limit-any and manage-rules are auth_admin_keep: a password
    assert _permissions(daemon.address, uid, gid) == {OWN: YES, ANY: AUTH, READ: YES,
                                                      RULES: AUTH}
    # polkit's defaults, no session: limit-own is auth_self_keep
    _, uid2, gid2 = another_user
    assert _permissions(daemon.address, uid2, gid2) == {OWN: AUTH, ANY: AUTH, READ: YES,
                                                        RULES: AUTH}


# --------------------------------------------------------------------------- properties
def test_issue10_limits_property_emits_properties_changed(daemon, sleeper):
    listener = Listener(daemon.address, PROPS_RULE)
    try:
        a, b = sleeper(), sleeper()
        assert daemon.call("SetLimit", f"uint32:{a.pid}", "uint64:51200", "uint64:0").ok
        assert daemon.call("SetLimit", f"uint32:{b.pid}", "uint64:0", "uint64:4096").ok
        assert daemon.call("SetLimit", f"uint32:{b.pid}", "uint64:8192", "uint64:4096").ok
        assert daemon.call("ClearLimit", f"uint32:{a.pid}").ok
        stop_pid(b)  # exits: the limit goes, Limits changes

        def limits_values():
            return [s["body"][1]["Limits"] for s in listener.signals()
                    if s["member"] == "PropertiesChanged" and "Limits" in s["body"][1]]

        assert listener.wait_for(lambda s: "Limits" in s["body"][1]
                                 and s["body"][1]["Limits"] == [], 10), listener.lines
        values = limits_values()
        attached = [s["body"][1]["AttachedCgroups"] for s in listener.signals()
                    if "AttachedCgroups" in s["body"][1]]
    finally:
        listener.stop()
    print("Limits values:", values)
    assert [sorted(v) for v in values[:4]] == [
        [[a.pid, 51200, 0]],
        sorted([[a.pid, 51200, 0], [b.pid, 0, 4096]]),
        sorted([[a.pid, 51200, 0], [b.pid, 8192, 4096]]),
        [[b.pid, 8192, 4096]],
    ], values
    assert values[-1] == []
    # the first limit attached the programs: AttachedCgroups changed once, to a real path
    assert len(attached) == 1 and attached[0] and attached[0][0].startswith("/"), attached


# --------------------------------------------------------------------------- interactive
AGENT_CLIENT = """
import asyncio, json, sys, time
from dbus_fast import Message, MessageFlag
from dbus_fast.aio import MessageBus

async def main(address, bus_name, path, iface, pid):
    bus = await MessageBus(bus_address=address).connect()
    print(json.dumps({"name": bus.unique_name}), flush=True)
    loop = asyncio.get_running_loop()
    while (line := (await loop.run_in_executor(None, sys.stdin.readline)).strip()):
        flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if line == "interactive" \\
            else MessageFlag.NONE
        t = time.monotonic()
        r = await bus.call(Message(destination=bus_name, path=path, interface=iface,
                                   member="SetLimit", signature="utt",
                                   body=[int(pid), 51200, 0], flags=flags))
        print(json.dumps({"error": r.error_name, "seconds": time.monotonic() - t}),
              flush=True)

asyncio.run(main(*sys.argv[1:]))
"""
PASSWORD = "Chadthrottle-test-1"


@pytest.fixture
def polkit_auth_self_for_any(system_bus, user):
    """polkit: the user may limit anyone's process after typing their own password."""
    rules = f"""
polkit.addRule(function(action, subject) {{
    if (action.id == "{names.POLKIT_ACTION_LIMIT_ANY}" && subject.user == "{user[0]}")
        return polkit.Result.AUTH_SELF;
}});
"""
    yield from run_polkitd(system_bus, rules)


def _agent(bus_dir: str, uid: int, gid: int, pid: int) -> tuple[subprocess.Popen, int]:
    """pkttyagent for process ``pid``, as the user, on a pseudo-terminal that is its
    controlling terminal.  Its setuid helper reaches the system bus only at the standard
    socket, so the agent runs in a private mount namespace where /run/dbus is the private
    bus's directory.  Returns (process, pty master) once the agent is registered."""
    master, slave = pty.openpty()
    notify_r, notify_w = os.pipe()
    agent = " ".join([*as_user(uid, gid), "pkttyagent", "--process", str(pid),
                      "--notify-fd", str(notify_w)])
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
         f"mount -t tmpfs tmpfs /run && mkdir /run/dbus && mount --bind '{bus_dir}' /run/dbus "
         f"&& exec {agent}"],
        stdin=slave, stdout=slave, stderr=slave, pass_fds=(notify_w,),
        preexec_fn=lambda: (os.setsid(), fcntl.ioctl(0, termios.TIOCSCTTY, 0)))
    os.close(slave)
    os.close(notify_w)
    try:
        os.read(notify_r, 1)  # EOF: registered (or gone)
    finally:
        os.close(notify_r)
    assert proc.poll() is None, _drain(master, 0.5)
    return proc, master


def test_issue10_interactive_authorization_reaches_the_agent(
        polkit_auth_self_for_any, system_bus, daemon, user, sleeper):
    """A user whose polkit rule says "auth_self" for limit-any: without the flag the call
    fails fast with NotAuthorized and no agent is asked; with the flag, the user's
    authentication agent asks for the password, and with it the call succeeds."""
    if not (shutil.which("pkttyagent") and shutil.which("unshare") and shutil.which("chpasswd")):
        pytest.skip("pkttyagent (polkitd), unshare or chpasswd missing")
    name, uid, gid = user
    subprocess.run(["chpasswd"], input=f"{name}:{PASSWORD}\n", text=True, check=True)
    target = sleeper()  # root's: limit-any
    client = subprocess.Popen(
        [*as_user(uid, gid), sys.executable, "-c", AGENT_CLIENT, daemon.address,
         names.BUS_NAME, names.OBJECT_PATH, names.INTERFACE, str(target.pid)],
        env=env_with(daemon.address), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    agent = master = None
    try:
        json.loads(client.stdout.readline())
        agent, master = _agent(str(Path(system_bus.split("=", 1)[1]).parent), uid, gid,
                               client.pid)

        def call(kind: str) -> dict:
            client.stdin.write(kind + "\n")
            client.stdin.flush()
            return json.loads(client.stdout.readline())

        r = call("bare")
        assert r["error"] == names.ERR_NOT_AUTHORIZED and r["seconds"] < 2, r
        assert b"AUTHENTICATING" not in _drain(master, 0.5)  # the agent was not asked
        client.stdin.write("interactive\n")
        client.stdin.flush()
        prompt = b""
        deadline = time.monotonic() + 15
        while b"Password:" not in prompt and time.monotonic() < deadline:
            prompt += _drain(master, 0.2)
        assert f"AUTHENTICATING FOR {names.POLKIT_ACTION_LIMIT_ANY}".encode() in prompt, prompt
        os.write(master, PASSWORD.encode() + b"\n")
        r = json.loads(client.stdout.readline())
        assert r["error"] is None, (r, _drain(master, 0.5))
        assert f"uint32 {target.pid}" in daemon.call("ListLimits").text
    finally:
        if agent is not None:
            stop_pid(agent)
            os.close(master)
        stop_pid(client)
