"""Issue 3, authorization with a real unprivileged user (created here, removed afterwards)
and a real polkitd on the private bus: the caller's uid comes from the bus; root may do
all; a user may limit their own processes when polkit allows limit-own; another user's
process needs limit-any; reads are open; without polkit only uid 0 may change limits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from chadthrottle import names
from conftest import (
    env_with,
    name_has_owner,
    requires_root,
    rules_allowing_own,
    run_polkitd,
)

pytestmark = requires_root

NOT_AUTHORIZED = names.ERR_NOT_AUTHORIZED


@pytest.fixture
def polkit_allowing_own(system_bus, user):
    yield from run_polkitd(system_bus, rules_allowing_own(user[0]))


@pytest.fixture
def polkit_defaults(system_bus):
    yield from run_polkitd(system_bus, None)


def _limits(daemon) -> str:
    r = daemon.call("ListLimits")
    assert r.ok, r
    return r.text


def _reads_are_open(daemon, uid, gid, pid):
    assert daemon.call("GetStats", f"uint32:{pid}", uid=uid, gid=gid).ok
    assert daemon.call("ListLimits", uid=uid, gid=gid).ok
    assert daemon.call("ListProcesses", uid=uid, gid=gid).ok


def test_without_polkit_only_root_may_change_limits(daemon, user, sleeper):
    _, uid, gid = user
    assert not name_has_owner(daemon.address, "org.freedesktop.PolicyKit1")
    own = sleeper(uid, gid)
    roots = sleeper()
    for pid in (own.pid, roots.pid):
        r = daemon.call("SetLimit", f"uint32:{pid}", "uint64:51200", "uint64:0", uid=uid, gid=gid)
        assert r.error == NOT_AUTHORIZED, r
    r = daemon.call("SetUnitLimit", "string:init.scope", "uint64:51200", "uint64:0",
                    uid=uid, gid=gid)
    assert r.error == NOT_AUTHORIZED, r
    assert f"uint32 {own.pid}" not in _limits(daemon)
    # root may; the user may not undo it
    assert daemon.call("SetLimit", f"uint32:{own.pid}", "uint64:51200", "uint64:0").ok
    r = daemon.call("ClearLimit", f"uint32:{own.pid}", uid=uid, gid=gid)
    assert r.error == NOT_AUTHORIZED, r
    assert f"uint32 {own.pid}" in _limits(daemon)
    _reads_are_open(daemon, uid, gid, own.pid)
    assert daemon.call("ClearLimit", f"uint32:{own.pid}").ok


def test_polkit_rules_allow_own_processes_only(polkit_allowing_own, daemon, user, sleeper):
    _, uid, gid = user
    own = sleeper(uid, gid)
    other = sleeper()  # root's
    nobody = sleeper(65534, 65534)
    r = daemon.call("SetLimit", f"uint32:{own.pid}", "uint64:51200", "uint64:0", uid=uid, gid=gid)
    assert r.ok, r
    assert f"uint32 {own.pid}" in _limits(daemon)
    for pid in (other.pid, nobody.pid):
        r = daemon.call("SetLimit", f"uint32:{pid}", "uint64:51200", "uint64:0",
                        uid=uid, gid=gid)
        assert r.error == NOT_AUTHORIZED, r
        assert f"uint32 {pid}" not in _limits(daemon)
    # a limit root set on someone else's process cannot be cleared by the user
    assert daemon.call("SetLimit", f"uint32:{other.pid}", "uint64:51200", "uint64:0").ok
    r = daemon.call("ClearLimit", f"uint32:{other.pid}", uid=uid, gid=gid)
    assert r.error == NOT_AUTHORIZED, r
    # a whole unit is "any"
    r = daemon.call("SetUnitLimit", "string:init.scope", "uint64:51200", "uint64:0",
                    uid=uid, gid=gid)
    assert r.error == NOT_AUTHORIZED, r
    _reads_are_open(daemon, uid, gid, other.pid)
    assert daemon.call("ClearLimit", f"uint32:{own.pid}", uid=uid, gid=gid).ok
    assert daemon.call("ClearLimit", f"uint32:{other.pid}").ok
    assert "uint32" not in _limits(daemon).split("array", 1)[1]


def test_polkit_defaults_deny_a_user_without_an_active_session(polkit_defaults, daemon, user,
                                                               sleeper):
    """No logind session here: limit-own falls to allow_any (auth_self_keep) and, with no
    authentication agent, is denied; root is never asked."""
    _, uid, gid = user
    own = sleeper(uid, gid)
    r = daemon.call("SetLimit", f"uint32:{own.pid}", "uint64:51200", "uint64:0", uid=uid, gid=gid)
    assert r.error == NOT_AUTHORIZED, r
    assert daemon.call("SetLimit", f"uint32:{own.pid}", "uint64:51200", "uint64:0").ok
    assert daemon.call("ClearLimit", f"uint32:{own.pid}").ok
    _reads_are_open(daemon, uid, gid, own.pid)


def test_uid_comes_from_the_bus_not_from_arguments(daemon, user, sleeper):
    """There is no argument to lie with: the same call as root succeeds, as the user not."""
    _, uid, gid = user
    p = sleeper(uid, gid)
    assert daemon.call("SetLimit", f"uint32:{p.pid}", "uint64:51200", "uint64:0",
                       uid=uid, gid=gid).error == NOT_AUTHORIZED
    assert os.geteuid() == 0
    assert daemon.call("SetLimit", f"uint32:{p.pid}", "uint64:51200", "uint64:0").ok
    assert daemon.call("ClearLimit", f"uint32:{p.pid}").ok


def test_call_without_interface_field_is_gated_too(daemon, user, sleeper):
    """dbus-fast would dispatch a call without an interface field straight to the @method;
    the gate (and the bus policy) must stop it: default deny."""
    _, uid, gid = user
    own = sleeper(uid, gid)
    code = (
        "import asyncio, sys\n"
        "from dbus_fast import Message\n"
        "from dbus_fast.aio import MessageBus\n"
        "async def main():\n"
        f"    bus = await MessageBus(bus_address={daemon.address!r}).connect()\n"
        f"    r = await bus.call(Message(destination={names.BUS_NAME!r}, "
        f"path={names.OBJECT_PATH!r}, member='SetLimit', signature='utt', "
        f"body=[{own.pid}, 51200, 0]))\n"
        "    print(r.message_type.name, r.error_name)\n"
        "asyncio.run(main())\n"
    )
    p = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                        sys.executable, "-c", code], env=env_with(daemon.address),
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    kind, err = p.stdout.split()
    assert kind == "ERROR", p.stdout
    assert err in (NOT_AUTHORIZED, "org.freedesktop.DBus.Error.AccessDenied"), p.stdout
    assert f"uint32 {own.pid}" not in _limits(daemon)


def test_gate_intercepts_calls_with_and_without_interface():
    """Unit test of the dispatcher (the bus policy above already refuses interface-less
    calls; the gate must not rely on it): every member of ours is intercepted, with or
    without the interface field; mutating calls are authorized, reads are answered at once
    without asking (issue 7, item 6); wrong signatures get InvalidArgs; the rest is left to
    the library."""
    import asyncio

    from dbus_fast import Message, MessageType

    from chadthrottle.service.interface import MEMBERS, Gate

    class Auth:
        async def authorize_change(self, sender, **kw):
            from chadthrottle.errors import NotAuthorized

            raise NotAuthorized("no")

        async def caller_uid(self, sender):
            return 1000

        async def permissions(self, sender):
            return {names.POLKIT_ACTION_READ: "yes"}

    class Iface:  # the reads' translations: answered without any authorization
        def serve_GetStats(self, pid):
            return [{}]

        def serve_ListLimits(self):
            return [[]]

        def serve_ListProcesses(self):
            return [[]]

        def serve_Subscribe(self, sender, uid, interval_ms):
            assert (sender, uid) == (":1.9", 1000)
            return []

        def serve_Unsubscribe(self, sender):
            assert sender == ":1.9"
            return []

        def serve_GetPermissions(self, permissions):
            return [permissions]

        def serve_ListRules(self):
            return [[]]

        def limit_owner(self, pid):
            return None

    class Bus:
        sent: list = []

        def send(self, m):
            self.sent.append(m)

    async def run():
        bus = Bus()
        gate = Gate(bus, Iface(), Auth())
        for iface in (names.INTERFACE, None):
            for m in MEMBERS.values():
                me = os.getpid()  # a live process: the gate opens it before asking
                body = {"u": [me], "utt": [me, 0, 0], "s": ["x"], "stt": ["x", 0, 0], "": [],
                        "a{sv}": [{}]}
                msg = Message(destination=names.BUS_NAME, path=names.OBJECT_PATH,
                              interface=iface, member=m.name, signature=m.in_sig,
                              body=body[m.in_sig], serial=1, sender=":1.9")
                r = gate(msg)
                if m.mutating or m.caller in ("sender+uid", "permissions"):
                    assert r is True, (iface, m.name)  # answered by a task
                else:
                    assert r.message_type is MessageType.METHOD_RETURN, (iface, m.name, r)
        await gate.drain()
        mutating = [r for r in bus.sent if r.error_name == names.ERR_NOT_AUTHORIZED]
        assert len(mutating) == 2 * sum(m.mutating for m in MEMBERS.values())
        callers = [r for r in bus.sent if r.message_type is MessageType.METHOD_RETURN]
        assert len(callers) == 2 * sum(m.caller in ("sender+uid", "permissions")
                                       for m in MEMBERS.values())
        wrong = Message(destination=names.BUS_NAME, path=names.OBJECT_PATH,
                        interface=None, member="SetLimit", signature="u", body=[5], serial=2,
                        sender=":1.9")
        r = gate(wrong)
        assert r.message_type is MessageType.ERROR
        assert r.error_name == "org.freedesktop.DBus.Error.InvalidArgs"
        other = Message(destination=names.BUS_NAME, path=names.OBJECT_PATH,
                        interface="org.freedesktop.DBus.Introspectable", member="Introspect",
                        serial=3, sender=":1.9")
        assert gate(other) is None

    asyncio.run(run())
