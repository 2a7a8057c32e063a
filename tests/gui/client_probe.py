"""The applet's bus client (chadthrottle.gui.bus.ThrottleClient) in a bare GLib main loop,
reporting every event as a JSON line on stdout, for test_client.py.

Runs on the distribution's /usr/bin/python3 (Gio from PyGObject).  Commands arrive as JSON
lines on stdin: ``["unique_name"]``, ``["set_limit", pid, down, up]``; the probe stops
(unsubscribing and leaving the bus) when stdin closes.
"""

from __future__ import annotations

import json
import sys

import gi

gi.require_version("GLib", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

from chadthrottle import names  # noqa: E402
from chadthrottle.gui.bus import ThrottleClient  # noqa: E402


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> int:
    loop = GLib.MainLoop()
    client = ThrottleClient()
    client.on("state", lambda state, detail: say(event="state", state=state, detail=detail))
    client.on("live-mode", lambda mode: say(event="live-mode", mode=mode))
    client.on("stats", lambda rows: say(
        event="stats", pids=[int(r.get("pid", 0)) for r in rows],
        comms=sorted({str(r.get("comm", "")) for r in rows})))
    client.on("limit-changed", lambda pid, d, u: say(
        event="limit-changed", pid=pid, download=d, upload=u, by_us=client.changed_by_us(pid)))
    client.on("limit-removed", lambda pid, reason: say(
        event="limit-removed", pid=pid, reason=reason, by_us=client.changed_by_us(pid)))
    client.on("limits", lambda limits: say(event="limits", limits=[list(x) for x in limits]))
    client.on("rules", lambda rules: say(
        event="rules", rules=None if rules is None else [str(r.get("id")) for r in rules]))
    client.on("permissions", lambda perms: say(event="permissions", permissions=perms))
    client.on("version", lambda v: say(event="version", version=v))

    # an unfiltered subscription beside the client's: it shows that forged signals did reach
    # this connection, so that their absence from the client's events means something
    raw = {"id": 0}

    def raw_signal(_conn, sender, _path, iface, member, params) -> None:
        args = params.unpack()
        pid = args[0] if args and isinstance(args[0], int) and member != "Stats" else None
        if member == "Stats":
            pid = [int(r.get("pid", 0)) for r in args[1]]
        say(event="raw-signal", sender=sender, member=member, pid=pid,
            from_owner=sender == client.owner)

    def watch_raw(state: str, _detail: str) -> None:
        if client.conn is not None and not raw["id"]:
            raw["id"] = client.conn.signal_subscribe(
                None, None, None, names.OBJECT_PATH, None, Gio.DBusSignalFlags.NONE, raw_signal)
    client.on("state", watch_raw)

    def command(line: str) -> None:
        cmd, *args = json.loads(line)
        if cmd == "unique_name":
            say(event="unique_name", name=client.unique_name)
        elif cmd == "set_limit":
            pid, d, u = (int(a) for a in args)
            client.set_limit(pid, d, u, lambda _r, err: say(
                event="reply", member="SetLimit", error=None if err is None else err.name))
        else:
            say(event="error", error=f"unknown command {cmd!r}")

    def on_stdin(channel: GLib.IOChannel, cond: GLib.IOCondition) -> bool:
        if cond & GLib.IOCondition.IN:
            line = channel.readline()
            if line:
                if line.strip():
                    command(line)
                return True
        loop.quit()
        return False

    ch = GLib.IOChannel.unix_new(sys.stdin.fileno())
    GLib.io_add_watch(ch, GLib.PRIORITY_DEFAULT, GLib.IOCondition.IN | GLib.IOCondition.HUP,
                      on_stdin)
    client.start()
    loop.run()
    client.stop()
    say(event="stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
