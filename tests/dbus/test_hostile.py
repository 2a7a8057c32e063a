"""Issue 3, bad input: thousands of hostile calls (hypothesis), each answered with the
contract's typed error; the daemon stays up and no limit leaks.

The calls are raw messages from a dbus-fast client so that any signature can be sent;
an oracle derived from DESIGN §2 says which answer each call must get.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chadthrottle import names

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
EXAMPLES = int(os.environ.get("CHADTHROTTLE_HOSTILE_EXAMPLES", "6000"))

SIGNATURES = {
    "SetLimit": "utt", "ClearLimit": "u", "GetStats": "u", "ListLimits": "",
    "SetUnitLimit": "stt", "ClearUnitLimit": "s", "ListProcesses": "",
}


class Client:
    """A synchronous face on a dbus-fast connection (its own event loop)."""

    def __init__(self, address: str) -> None:
        self.loop = asyncio.new_event_loop()

        async def connect():
            return await MessageBus(bus_address=address).connect()

        self.bus = self.loop.run_until_complete(connect())

    def call(self, member: str, signature: str, body: list) -> Message:
        msg = Message(destination=names.BUS_NAME, path=names.OBJECT_PATH,
                      interface=names.INTERFACE, member=member, signature=signature, body=body)
        return self.loop.run_until_complete(asyncio.wait_for(self.bus.call(msg), 20))

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


def kernel_thread_pid() -> int:
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[6]) & 0x00200000:
                    return int(d)
            except OSError:
                continue
    raise RuntimeError("no kernel thread found")


def free_pid() -> int:
    pid_max = int(open("/proc/sys/kernel/pid_max").read())
    for pid in range(pid_max - 1, 2, -1):
        if not os.path.exists(f"/proc/{pid}"):
            return pid
    raise RuntimeError("no free pid")


@pytest.fixture
def targets(daemon, sleeper):
    """pid -> expected class: 'bad' (NoSuchProcess), 'forbidden' (InvalidLimit), 'ok'."""
    live = sleeper()
    thread_owner = subprocess.Popen(
        ["python3", "-c", "import threading,time;threading.Thread(target=time.sleep,"
         "args=(300,),daemon=True).start();print(flush=True);time.sleep(300)"],
        stdout=subprocess.PIPE, text=True)
    thread_owner.stdout.readline()
    tids = [int(t) for t in os.listdir(f"/proc/{thread_owner.pid}/task")
            if int(t) != thread_owner.pid]
    try:
        yield {
            0: "bad", U32_MAX: "bad", free_pid(): "bad", kernel_thread_pid(): "bad",
            tids[0]: "bad",  # a thread, not a process
            1: "forbidden", daemon.pid: "forbidden",
            live.pid: "ok",
        }
    finally:
        thread_owner.kill()
        thread_owner.wait()


RATES = st.one_of(
    st.sampled_from([0, 1, 1023, 1024, 51200, 1 << 20, 1 << 40, (1 << 40) + 1, U64_MAX]),
    st.integers(min_value=names.RATE_MIN, max_value=names.RATE_MAX),
    st.integers(min_value=0, max_value=U64_MAX),
)
UNITS = st.one_of(
    st.sampled_from(["", "/", ".", "..", "../..", "/../../etc", "no-such.service",
                     "nope.scope", "a/b/c", "user.slice", "init.scope", "-.slice",
                     "//", "%2e%2e", "x" * 300, "system.slice/../../..", "\u00e9.service"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
            max_size=40),
)
WRONG = st.sampled_from([
    ("", []), ("s", ["x"]), ("u", [5]), ("uu", [1, 2]), ("ut", [1, 2]), ("uttt", [1, 2, 3, 4]),
    ("sss", ["a", "b", "c"]), ("ay", [b"\x01"]), ("d", [1.5]), ("tt", [1, 2]),
    ("v", [Variant("u", 1)]), ("a{sv}", [{}]),
])


def valid_rate(r: int) -> bool:
    return r == 0 or names.RATE_MIN <= r <= names.RATE_MAX


def test_hostile_input(daemon, targets):
    client = Client(daemon.address)
    pids = sorted(targets)
    limited: set[int] = set()
    units_touched: set[str] = set()
    units_held: set[str] = set()
    counts: dict[str, int] = {}

    def expect_error(reply: Message, names_ok: set[str], what) -> str:
        assert daemon.alive(), f"daemon died at {what}"
        got = reply.error_name if reply.message_type is MessageType.ERROR else None
        assert got in names_ok, f"{what}: got {got} {reply.body}, expected one of {names_ok}"
        counts[str(got)] = counts.get(str(got), 0) + 1
        return got

    call = st.one_of(
        st.tuples(st.just("SetLimit"), st.sampled_from(pids), RATES, RATES),
        st.tuples(st.just("ClearLimit"), st.sampled_from(pids)),
        st.tuples(st.just("GetStats"), st.sampled_from(pids)),
        st.tuples(st.just("SetUnitLimit"), UNITS, RATES, RATES),
        st.tuples(st.just("ClearUnitLimit"), UNITS),
        st.tuples(st.just("wrong"), st.sampled_from(sorted(SIGNATURES)), WRONG),
        st.tuples(st.just("unknown"), st.sampled_from(["Frob", "setlimit", "SetLimits"])),
        st.tuples(st.just("ListLimits")),
    )

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(call)
    def one(c):
        kind = c[0]
        if kind == "SetLimit":
            _, pid, d, u = c
            r = client.call("SetLimit", "utt", [pid, d, u])
            if not (valid_rate(d) and valid_rate(u)):
                expect_error(r, {names.ERR_INVALID_LIMIT}, c)
            elif targets[pid] == "bad":
                expect_error(r, {names.ERR_NO_SUCH_PROCESS}, c)
            elif targets[pid] == "forbidden":
                expect_error(r, {names.ERR_INVALID_LIMIT}, c)
            else:
                expect_error(r, {None}, c)
                (limited.discard if d == 0 and u == 0 else limited.add)(pid)
        elif kind == "ClearLimit":
            pid = c[1]
            r = client.call("ClearLimit", "u", [pid])
            if pid in limited:
                expect_error(r, {None}, c)
                limited.discard(pid)
            else:
                expect_error(r, {names.ERR_NO_SUCH_LIMIT}, c)
        elif kind == "GetStats":
            pid = c[1]
            r = client.call("GetStats", "u", [pid])
            expect_error(r, {names.ERR_NO_SUCH_PROCESS} if targets[pid] == "bad" else {None}, c)
            if r.message_type is MessageType.METHOD_RETURN:
                assert r.body[0]["pid"].value == pid
                assert r.body[0]["status"].value in {
                    names.STATUS_THROTTLED, names.STATUS_NOT_WORKING,
                    names.STATUS_PROGRAM_NOT_CALLED, names.STATUS_NOT_DROPPING,
                    names.STATUS_UNLIMITED}
        elif kind == "SetUnitLimit":
            _, unit, d, u = c
            r = client.call("SetUnitLimit", "stt", [unit, d, u])
            units_touched.add(unit)
            if not (valid_rate(d) and valid_rate(u)):
                expect_error(r, {names.ERR_INVALID_LIMIT}, c)
            else:
                # an existing cgroup may be accepted; the root is refused; the rest is unknown
                got = expect_error(r, {None, names.ERR_NO_SUCH_UNIT, names.ERR_INVALID_LIMIT,
                                       names.ERR_UNSUPPORTED}, c)
                if got is None:
                    (units_held.discard if d == 0 and u == 0 else units_held.add)(unit)
        elif kind == "ClearUnitLimit":
            unit = c[1]
            units_touched.add(unit)
            r = client.call("ClearUnitLimit", "s", [unit])
            got = expect_error(r, {None, names.ERR_NO_SUCH_LIMIT, names.ERR_NO_SUCH_UNIT}, c)
            if got is None:
                units_held.discard(unit)
        elif kind == "wrong":
            _, member, (sig, body) = c
            if sig == SIGNATURES[member]:
                return
            r = client.call(member, sig, body)
            expect_error(r, {INVALID_ARGS}, c)
        elif kind == "unknown":
            r = client.call(c[1], "", [])
            expect_error(r, {UNKNOWN_METHOD}, c)
        else:
            r = client.call("ListLimits", "", [])
            expect_error(r, {None}, c)
            assert sorted(p for p, _d, _u in r.body[0]) == sorted(limited)

    try:
        one()
        # no leak: clear what the model says is held, then nothing is left
        for pid in sorted(limited):
            assert client.call("ClearLimit", "u", [pid]).message_type is MessageType.METHOD_RETURN
        for unit in sorted(units_held):
            client.call("ClearUnitLimit", "s", [unit])
        r = client.call("ListLimits", "", [])
        assert r.body == [[]], r.body
        for unit in sorted(units_touched):
            r = client.call("ClearUnitLimit", "s", [unit])
            assert r.error_name in (names.ERR_NO_SUCH_LIMIT, names.ERR_NO_SUCH_UNIT), (unit, r.body)
        assert daemon.alive()
        assert "Traceback" not in daemon.log(), daemon.log()[-3000:]
        print("answers:", counts)
    finally:
        client.close()
