"""The bus contract as the outside sees it: introspection == dbus/…xml, properties,
typed errors, bus policy, sd_notify, and the systemd unit (issue 3)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dbus_fast.introspection import Node

from chadthrottle import __version__, names
from conftest import ROOT, env_with, start_daemon, stop_pid

XML = ROOT / "dbus" / "org.chadthrottle.Throttle1.xml"
UNIT = ROOT / "packaging" / "chadthrottled.service"


def _shape(iface):
    """A comparable form of an introspected interface (names, types, directions, access)."""
    return {
        "methods": sorted(
            (m.name, tuple((a.name, a.signature, a.direction.value) for a in m.in_args),
             tuple((a.name, a.signature, a.direction.value) for a in m.out_args))
            for m in iface.methods),
        "signals": sorted(
            (s.name, tuple((a.name, a.signature) for a in s.args)) for s in iface.signals),
        "properties": sorted((p.name, p.signature, p.access.value) for p in iface.properties),
    }


def _iface(node: Node):
    found = [i for i in node.interfaces if i.name == names.INTERFACE]
    assert len(found) == 1, [i.name for i in node.interfaces]
    return found[0]


def test_introspection_equals_contract_xml(daemon):
    p = subprocess.run(
        ["busctl", "--system", "call", names.BUS_NAME, names.OBJECT_PATH,
         "org.freedesktop.DBus.Introspectable", "Introspect", "--json=short"],
        env=env_with(daemon.address), capture_output=True, text=True, check=True, timeout=10)
    import json

    live = Node.parse(json.loads(p.stdout)["data"][0])
    contract = Node.parse(XML.read_text())
    assert _shape(_iface(live)) == _shape(_iface(contract))
    # the standard interfaces are there too (Properties for Version/AttachedCgroups)
    assert {"org.freedesktop.DBus.Properties", "org.freedesktop.DBus.Introspectable"} <= {
        i.name for i in live.interfaces}


def test_contract_xml_matches_the_design_table():
    shape = _shape(_iface(Node.parse(XML.read_text())))
    sigs = {m[0]: ("".join(a[1] for a in m[1]), "".join(a[1] for a in m[2]))
            for m in shape["methods"]}
    assert sigs == {
        "SetLimit": ("utt", ""), "ClearLimit": ("u", ""), "GetStats": ("u", "a{sv}"),
        "ListLimits": ("", "a(utt)"), "SetUnitLimit": ("stt", ""),
        "ClearUnitLimit": ("s", ""), "ListProcesses": ("", "aa{sv}"),
        # DESIGN §2b (issue 10)
        "Subscribe": ("u", ""), "Unsubscribe": ("", ""), "GetPermissions": ("", "a{ss}"),
        # DESIGN §2b (issue 9)
        "AddRule": ("a{sv}", "s"), "RemoveRule": ("s", ""), "ListRules": ("", "aa{sv}"),
        "Reload": ("", ""),
    }
    assert {s[0]: "".join(a[1] for a in s[1]) for s in shape["signals"]} == {
        "LimitChanged": "utt", "LimitRemoved": "us", "Stats": "taa{sv}", "RulesChanged": ""}
    assert shape["properties"] == [("AttachedCgroups", "as", "read"), ("Limits", "a(utt)", "read"),
                                   ("Version", "s", "read")]


def test_properties(daemon, sleeper):
    env = env_with(daemon.address)

    def prop(name):
        return subprocess.run(
            ["busctl", "--system", "get-property", names.BUS_NAME, names.OBJECT_PATH,
             names.INTERFACE, name], env=env, capture_output=True, text=True, check=True,
            timeout=10).stdout.strip()

    assert prop("Version") == f's "{__version__}"'
    p = sleeper()
    assert daemon.call("SetLimit", f"uint32:{p.pid}", "uint64:51200", "uint64:0").ok
    attached = prop("AttachedCgroups")
    assert re.match(r'as [1-9]\d* "', attached), attached
    # read-only: Set is refused by the library's Properties handler
    r = subprocess.run(["busctl", "--system", "set-property", names.BUS_NAME, names.OBJECT_PATH,
                        names.INTERFACE, "Version", "s", "9"], env=env, capture_output=True,
                       text=True, timeout=10)
    assert r.returncode != 0


def test_wrong_signature_is_invalid_args_and_unknown_member_is_unknown_method(daemon):
    r = daemon.call("SetLimit", "uint32:1234", "uint64:51200")
    assert r.error == "org.freedesktop.DBus.Error.InvalidArgs", r
    r = daemon.call("GetStats", "string:1234")
    assert r.error == "org.freedesktop.DBus.Error.InvalidArgs", r
    r = daemon.call("Frobnicate")
    assert r.error == "org.freedesktop.DBus.Error.UnknownMethod", r


def test_typed_errors(daemon):
    assert daemon.call("SetLimit", "uint32:1", "uint64:51200", "uint64:0").error == \
        names.ERR_INVALID_LIMIT
    assert daemon.call("SetLimit", f"uint32:{daemon.pid}", "uint64:51200",
                       "uint64:0").error == names.ERR_INVALID_LIMIT
    assert daemon.call("SetLimit", "uint32:0", "uint64:51200", "uint64:0").error == \
        names.ERR_NO_SUCH_PROCESS
    assert daemon.call("GetStats", "uint32:2").error == names.ERR_NO_SUCH_PROCESS  # kthreadd
    assert daemon.call("ClearLimit", "uint32:4242").error == names.ERR_NO_SUCH_LIMIT
    assert daemon.call("SetUnitLimit", "string:no-such.service", "uint64:51200",
                       "uint64:0").error == names.ERR_NO_SUCH_UNIT
    assert daemon.call("SetUnitLimit", "string:../../../etc", "uint64:51200",
                       "uint64:0").error == names.ERR_NO_SUCH_UNIT
    assert daemon.call("ListLimits").ok


def test_bus_policy_only_root_owns_the_name(system_bus):
    """An unprivileged connection may not own org.chadthrottle.Throttle1."""
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
         "/org/freedesktop/DBus", "org.freedesktop.DBus.RequestName",
         f"string:{names.BUS_NAME}", "uint32:4"],
        env=env_with(system_bus), capture_output=True, text=True, timeout=10)
    assert "org.freedesktop.DBus.Error.AccessDenied" in r.stderr, (r.stdout, r.stderr)


def test_sd_notify_ready_status_watchdog_stopping(system_bus, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    sock_path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    env = env_with(system_bus, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="1000000")
    d = start_daemon(system_bus, tmp_path / "d.log", env=env)
    got: list[str] = []
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum("WATCHDOG=1" in g for g in got) < 2:
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                pass
        rc = d.stop()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                got.append(sock.recv(4096).decode())
            except TimeoutError:
                break
    finally:
        stop_pid(d.proc)
        sock.close()
    text = "\n".join(got)
    assert rc == 0
    assert "READY=1" in text and "STATUS=serving" in text
    assert text.count("WATCHDOG=1") >= 2  # every WATCHDOG_USEC/2
    assert "STOPPING=1" in text
    assert text.index("READY=1") < text.index("STOPPING=1")


def _unit_with_bindir(tmp_path: Path) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "chadthrottled"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} -m chadthrottle.server.main \"$@\"\n")
    exe.chmod(0o755)
    unit = tmp_path / "chadthrottled.service"
    unit.write_text(UNIT.read_text().replace("@BINDIR@", str(bindir)))
    return unit


def test_systemd_analyze_verify(tmp_path):
    unit = _unit_with_bindir(tmp_path)
    p = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    text = UNIT.read_text()
    assert "@BINDIR@/chadthrottled" in text
    assert re.search(r"^Type=(notify|dbus)$", text, re.M)
    assert re.search(r"^BusName=org\.chadthrottle\.Throttle1$", text, re.M)
    assert re.search(r"^Restart=on-failure$", text, re.M)


def test_systemd_analyze_security_exposure(tmp_path):
    """Not a gate, a figure for the README: the exposure level of the unit (lower is better)."""
    unit = _unit_with_bindir(tmp_path)
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", p.stdout)
    if not m:
        pytest.skip("systemd-analyze security --offline is not available here")
    print(f"exposure {m.group(1)} {m.group(2)}")
    assert float(m.group(1)) < 5.0


def test_bus_activation_file_points_at_the_unit():
    text = (ROOT / "dbus" / "org.chadthrottle.Throttle1.service").read_text()
    assert f"Name={names.BUS_NAME}" in text
    assert f"SystemdService={names.SYSTEMD_UNIT}" in text
    assert "Alias=dbus-org.chadthrottle.Throttle1.service" in UNIT.read_text()


def test_polkit_policy_declares_the_actions():
    import xml.etree.ElementTree as ET

    tree = ET.parse(ROOT / "dbus" / "org.chadthrottle.throttle.policy")
    actions = {a.get("id"): {d.tag: d.text for d in a.find("defaults")}
               for a in tree.getroot().iter("action")}
    assert actions[names.POLKIT_ACTION_LIMIT_OWN]["allow_active"] == "yes"
    assert actions[names.POLKIT_ACTION_LIMIT_ANY]["allow_active"] == "auth_admin_keep"
    assert actions[names.POLKIT_ACTION_READ]["allow_active"] == "yes"
    assert actions[names.POLKIT_ACTION_MANAGE_RULES] == dict.fromkeys(
        ("allow_any", "allow_inactive", "allow_active"), "auth_admin_keep")
    assert set(actions) == set(names.POLKIT_ACTIONS)
    assert not any(p.suffix == ".py" for p in (ROOT / "dbus").iterdir())
