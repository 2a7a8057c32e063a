"""A stand-in for a desktop panel's tray: it owns org.kde.StatusNotifierWatcher on the
session bus as panels do, records the items that register, and reads or clicks them.

Runs on /usr/bin/python3 (Gio).  JSON lines: events out (``{"event": "registered", ...}``),
commands in (``["get", "ToolTip"]``, ``["activate"]``); stops when stdin closes.
"""

from __future__ import annotations

import json
import sys

import gi

gi.require_version("Gio", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

WATCHER_XML = """
<node>
  <interface name="org.kde.StatusNotifierWatcher">
    <method name="RegisterStatusNotifierItem"><arg name="service" type="s" direction="in"/>
    </method>
    <method name="RegisterStatusNotifierHost"><arg name="service" type="s" direction="in"/>
    </method>
    <property name="RegisteredStatusNotifierItems" type="as" access="read"/>
    <property name="IsStatusNotifierHostRegistered" type="b" access="read"/>
    <property name="ProtocolVersion" type="i" access="read"/>
  </interface>
</node>
"""
ITEM_IFACE = "org.kde.StatusNotifierItem"


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> int:
    loop = GLib.MainLoop()
    conn = Gio.bus_get_sync(Gio.BusType.SESSION, None)
    items: list[str] = []
    info = Gio.DBusNodeInfo.new_for_xml(WATCHER_XML).interfaces[0]

    def call(_c, sender, _path, _iface, method, params, invocation) -> None:
        if method == "RegisterStatusNotifierItem":
            service = params.unpack()[0]
            items.append(sender)
            say(event="registered", service=service, sender=sender)
        invocation.return_value(None)

    def get(_c, _sender, _path, _iface, prop):
        return {"RegisteredStatusNotifierItems": GLib.Variant("as", items),
                "IsStatusNotifierHostRegistered": GLib.Variant("b", True),
                "ProtocolVersion": GLib.Variant("i", 0)}.get(prop)

    conn.register_object("/StatusNotifierWatcher", info, call, get, None)

    def on_signal(_c, sender, _path, _iface, member, params) -> None:
        if sender in items:
            say(event="signal", member=member, args=params.unpack() if params else None)

    conn.signal_subscribe(None, ITEM_IFACE, None, "/StatusNotifierItem", None,
                          Gio.DBusSignalFlags.NONE, on_signal)

    def command(line: str) -> None:
        cmd, *args = json.loads(line)
        if not items:
            say(event="error", error="no item registered")
            return
        if cmd == "get":
            r = conn.call_sync(items[-1], "/StatusNotifierItem", "org.freedesktop.DBus.Properties",
                               "Get", GLib.Variant("(ss)", (ITEM_IFACE, args[0])), None,
                               Gio.DBusCallFlags.NONE, 10_000, None)
            say(event="value", name=args[0], value=r.unpack()[0])
        elif cmd == "activate":
            conn.call_sync(items[-1], "/StatusNotifierItem", ITEM_IFACE, "Activate",
                           GLib.Variant("(ii)", (0, 0)), None, Gio.DBusCallFlags.NONE, 10_000,
                           None)
            say(event="activated")

    def on_stdin(channel: GLib.IOChannel, cond: GLib.IOCondition) -> bool:
        if cond & GLib.IOCondition.IN:
            line = channel.readline()
            if line:
                if line.strip():
                    try:
                        command(line)
                    except GLib.Error as e:
                        say(event="error", error=e.message)
                return True
        loop.quit()
        return False

    def owned(*_a) -> None:
        say(event="watching")

    Gio.bus_own_name_on_connection(conn, "org.kde.StatusNotifierWatcher",
                                   Gio.BusNameOwnerFlags.NONE, owned, None)
    ch = GLib.IOChannel.unix_new(sys.stdin.fileno())
    GLib.io_add_watch(ch, GLib.PRIORITY_DEFAULT, GLib.IOCondition.IN | GLib.IOCondition.HUP,
                      on_stdin)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
