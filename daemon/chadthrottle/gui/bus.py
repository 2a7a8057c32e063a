"""The applet's side of the bus: a GDBus (Gio) client of org.chadthrottle.Throttle1.

No GTK here, only GLib/Gio, so it runs in the applet and in a bare ``GLib.MainLoop``.

* Its own connection to the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` is honoured); when the
  bus cannot be reached it says so and tries again every few seconds.
* ``Gio.bus_watch_name_on_connection`` follows the daemon's name: ``down`` while nobody owns
  it, ``up`` as soon as the daemon (re)appears — live recovery without a restart.
* Signals are subscribed with the *unique name* of the name's current owner as sender and
  checked again on arrival, so a signal forged by another connection (any user may send
  signals on the system bus) never reaches the window.
* Live data without polling: ``Subscribe(1000)`` and the unicast ``Stats`` signal.  Only
  when the daemon does not know Subscribe (``UnknownMethod``) it falls back to calling
  ``ListProcesses`` once a second; any other refusal is reported and Subscribe is asked
  again a few seconds later.
* Mutating calls carry ``ALLOW_INTERACTIVE_AUTHORIZATION`` so a desktop polkit agent can ask
  for a password; they wait up to two minutes for it.

Events are plain callbacks: ``client.on("stats", fn)``; see :data:`EVENTS`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gi

gi.require_version("Gio", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

from chadthrottle import names  # noqa: E402

STATS_INTERVAL_MS = 1000
RECONNECT_S = 3
READ_TIMEOUT_MS = 25_000
WRITE_TIMEOUT_MS = 120_000  # a polkit agent may be waiting for the password
OWN_CHANGE_WINDOW_S = 5.0

DBUS_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
DBUS_UNKNOWN_PROPERTY = "org.freedesktop.DBus.Error.UnknownProperty"
DBUS_INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
DBUS_SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"
PROPERTIES = "org.freedesktop.DBus.Properties"

EVENTS = (
    "state",        # (state, detail): "connecting" | "no-bus" | "down" | "up"
    "stats",        # (rows: list[dict]) one sample, from Stats or ListProcesses
    "live-mode",    # ("subscribed" | "polling")
    "limit-changed",  # (pid, download, upload)
    "limit-removed",  # (pid, reason)
    "limits",       # (list[(pid, download, upload)])
    "rules",        # (list[dict] | None): None = the daemon has no rules API
    "permissions",  # (dict[action, "yes"|"auth"|"no"] | None): None = not offered
    "version",      # (str)
)

# the a{sv} types of rule keys (DESIGN §2b)
RULE_KEY_TYPES = {
    "name": "s", "exe": "s", "comm": "s", "cmdline": "s", "uid": "u", "unit": "s",
    "scope": "s", "download": "t", "upload": "t", "permanent": "b", "enabled": "b",
}


@dataclass
class CallError:
    """A failed call: the D-Bus error name (or a GLib one) and the daemon's message."""
    name: str
    text: str

    def __str__(self) -> str:
        return f"{self.text} [{self.name}]" if self.text else self.name


def call_error(err: GLib.Error) -> CallError:
    name = Gio.DBusError.get_remote_error(err) or ""
    msg = err.message or ""
    if name:
        prefix = f"GDBus.Error:{name}: "
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    else:
        name = f"{GLib.quark_to_string(err.domain)}.{err.code}"
    return CallError(name, msg.strip())


def rule_variant(rule: dict[str, Any]) -> GLib.Variant:
    """A rule dict -> the (a{sv}) argument of AddRule; unknown keys are refused here."""
    body = {}
    for key, value in rule.items():
        sig = RULE_KEY_TYPES.get(key)
        if sig is None:
            raise ValueError(f"unknown rule key {key!r}")
        body[key] = GLib.Variant(sig, value)
    return GLib.Variant("(a{sv})", (body,))


Callback = Callable[[Any, CallError | None], None]


class ThrottleClient:
    def __init__(self, interval_ms: int = STATS_INTERVAL_MS) -> None:
        self.interval_ms = interval_ms
        self.conn: Gio.DBusConnection | None = None
        self.owner: str | None = None  # unique name of the daemon's connection
        self.state = "connecting"
        self.detail = ""
        self.live_mode = ""
        self.has_limits_property = False
        self.rules_supported: bool | None = None
        self.permissions: dict[str, str] | None = None
        self._handlers: dict[str, list[Callable]] = {e: [] for e in EVENTS}
        self._watch_id = 0
        self._sub_ids: list[int] = []
        self._poll_id = 0
        self._poll_pending = False
        self._retry_id = 0
        self._closed_handler = 0
        self._generation = 0  # bumped whenever the owner changes: stale replies are dropped
        self._own_changes: dict[int, float] = {}
        self._stopped = False

    # --- events -------------------------------------------------------------------------------
    def on(self, event: str, fn: Callable) -> None:
        if event not in self._handlers:
            raise ValueError(f"unknown event {event!r}")
        self._handlers[event].append(fn)

    def _emit(self, event: str, *args: Any) -> None:
        for fn in list(self._handlers[event]):
            fn(*args)

    def _set_state(self, state: str, detail: str = "") -> None:
        self.state, self.detail = state, detail
        self._emit("state", state, detail)

    # --- connection ---------------------------------------------------------------------------
    def start(self) -> None:
        self._stopped = False
        self._connect()

    def _connect(self) -> None:
        self._retry_id = 0
        self._set_state("connecting")
        try:
            address = Gio.dbus_address_get_for_bus_sync(Gio.BusType.SYSTEM, None)
        except GLib.Error as e:
            self._no_bus(call_error(e).text)
            return GLib.SOURCE_REMOVE
        flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                 | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
        Gio.DBusConnection.new_for_address(address, flags, None, None, self._connected, address)
        return GLib.SOURCE_REMOVE

    def _connected(self, _src: Any, res: Gio.AsyncResult, address: str) -> None:
        try:
            conn = Gio.DBusConnection.new_for_address_finish(res)
        except GLib.Error as e:
            self._no_bus(f"{address}: {call_error(e).text}")
            return
        if self._stopped:
            conn.close(None, None, None)
            return
        self.conn = conn
        conn.set_exit_on_close(False)
        self._closed_handler = conn.connect("closed", self._on_closed)
        self._watch_id = Gio.bus_watch_name_on_connection(
            conn, names.BUS_NAME, Gio.BusNameWatcherFlags.NONE, self._appeared, self._vanished)

    def _no_bus(self, why: str) -> None:
        self._set_state("no-bus", why)
        if not self._stopped and not self._retry_id:
            self._retry_id = GLib.timeout_add_seconds(RECONNECT_S, self._connect)

    def _on_closed(self, conn: Gio.DBusConnection, _remote: bool, error: GLib.Error | None):
        self._drop_owner()
        self._teardown_connection()
        self._no_bus(call_error(error).text if error else "the system bus closed the connection")

    def _teardown_connection(self) -> None:
        if self._watch_id:
            Gio.bus_unwatch_name(self._watch_id)
            self._watch_id = 0
        if self.conn is not None and self._closed_handler:
            self.conn.disconnect(self._closed_handler)
            self._closed_handler = 0
        self.conn = None

    def stop(self) -> None:
        """Unsubscribe (best effort) and leave the bus."""
        self._stopped = True
        if self._retry_id:
            GLib.source_remove(self._retry_id)
            self._retry_id = 0
        conn = self.conn
        if conn is not None and self.owner and self.live_mode == "subscribed":
            try:
                conn.call_sync(names.BUS_NAME, names.OBJECT_PATH, names.INTERFACE,
                               "Unsubscribe", None, None, Gio.DBusCallFlags.NO_AUTO_START,
                               2000, None)
            except GLib.Error:
                pass
        self._drop_owner()
        self._teardown_connection()
        if conn is not None and not conn.is_closed():
            conn.close_sync(None)

    @property
    def unique_name(self) -> str:
        return self.conn.get_unique_name() if self.conn is not None else ""

    # --- the daemon's name --------------------------------------------------------------------
    def _appeared(self, conn: Gio.DBusConnection, _name: str, owner: str) -> None:
        if owner == self.owner:
            return
        self._drop_owner()
        self.owner = owner
        self._generation += 1
        for member in ("Stats", "LimitChanged", "LimitRemoved", "RulesChanged"):
            self._sub_ids.append(conn.signal_subscribe(
                owner, names.INTERFACE, member, names.OBJECT_PATH, None,
                Gio.DBusSignalFlags.NONE, self._on_signal))
        self._sub_ids.append(conn.signal_subscribe(
            owner, PROPERTIES, "PropertiesChanged", names.OBJECT_PATH, names.INTERFACE,
            Gio.DBusSignalFlags.NONE, self._on_signal))
        self._set_state("up", owner)
        self.refresh_permissions()
        self._subscribe()
        self._load_limits()
        self.refresh_rules()
        self._read("org.freedesktop.DBus.Properties", "Get",
                   GLib.Variant("(ss)", (names.INTERFACE, "Version")), "(v)",
                   lambda r, e: e is None and self._emit("version", str(r[0])))

    def _vanished(self, _conn: Gio.DBusConnection | None, _name: str) -> None:
        had = self.owner is not None or self.state in ("connecting", "up")
        self._drop_owner()
        if had or self.state != "down":
            self._set_state("down", "")

    def _drop_owner(self) -> None:
        if self.conn is not None:
            for sid in self._sub_ids:
                self.conn.signal_unsubscribe(sid)
        self._sub_ids.clear()
        if self._poll_id:
            GLib.source_remove(self._poll_id)
            self._poll_id = 0
        self._poll_pending = False
        self.owner = None
        self.live_mode = ""
        self._generation += 1

    # --- live data ----------------------------------------------------------------------------
    def _subscribe(self) -> None:
        gen = self._generation

        def done(_r: Any, err: CallError | None) -> None:
            if err is None:
                self.live_mode = "subscribed"
                self._emit("live-mode", "subscribed")
            elif err.name == DBUS_UNKNOWN_METHOD:
                # today's daemon: no Subscribe, so ListProcesses once a second
                self.live_mode = "polling"
                self._emit("live-mode", "polling")
                self._poll()
                self._poll_id = GLib.timeout_add(self.interval_ms, self._poll)
            else:  # the daemon knows Subscribe but refused or failed: ask again later
                self.live_mode = ""
                self._emit("live-mode", f"error: {err}")
                self._poll_id = GLib.timeout_add_seconds(RECONNECT_S, retry)

        def retry() -> bool:
            self._poll_id = 0
            if gen == self._generation and self.owner is not None:
                self._subscribe()
            return GLib.SOURCE_REMOVE

        self._read(names.INTERFACE, "Subscribe", GLib.Variant("(u)", (self.interval_ms,)),
                   None, done)

    def _poll(self) -> bool:
        if self._poll_pending:
            return GLib.SOURCE_CONTINUE
        self._poll_pending = True

        def done(r: Any, err: CallError | None) -> None:
            self._poll_pending = False
            if err is None:
                self._emit("stats", list(r[0]))

        self._read(names.INTERFACE, "ListProcesses", None, "(aa{sv})", done)
        return GLib.SOURCE_CONTINUE

    def _on_signal(self, _conn: Gio.DBusConnection, sender: str, path: str, iface: str,
                   member: str, params: GLib.Variant) -> None:
        # GDBus matched the sender already; check again, so that nothing but the current
        # owner of the daemon's name is ever believed
        if self.owner is None or sender != self.owner or path != names.OBJECT_PATH:
            return
        try:
            args = params.unpack()
        except (TypeError, ValueError):
            return
        if iface == PROPERTIES:
            if params.get_type_string() != "(sa{sv}as)" or args[0] != names.INTERFACE:
                return
            changed, invalidated = args[1], args[2]
            if "Limits" in changed:
                self.has_limits_property = True
                self._emit("limits", [tuple(x) for x in changed["Limits"]])
            elif "Limits" in invalidated:
                self._load_limits()
            return
        sig = params.get_type_string()
        if member == "Stats" and sig == "(taa{sv})":
            self._emit("stats", list(args[1]))
        elif member == "LimitChanged" and sig == "(utt)":
            self._emit("limit-changed", *args)
            if not self.has_limits_property:
                self._load_limits()
        elif member == "LimitRemoved" and sig == "(us)":
            self._emit("limit-removed", *args)
            if not self.has_limits_property:
                self._load_limits()
        elif member == "RulesChanged":
            self.refresh_rules()

    # --- reads --------------------------------------------------------------------------------
    def _load_limits(self) -> None:
        def from_property(r: Any, err: CallError | None) -> None:
            if err is None:
                self.has_limits_property = True
                self._emit("limits", [tuple(x) for x in r[0]])
            else:
                self.has_limits_property = False
                self.list_limits()

        self._read(PROPERTIES, "Get", GLib.Variant("(ss)", (names.INTERFACE, "Limits")),
                   "(v)", from_property)

    def list_limits(self) -> None:
        self._read(names.INTERFACE, "ListLimits", None, "(a(utt))",
                   lambda r, e: e is None and self._emit("limits", [tuple(x) for x in r[0]]))

    def refresh_rules(self) -> None:
        def done(r: Any, err: CallError | None) -> None:
            if err is None:
                self.rules_supported = True
                self._emit("rules", list(r[0]))
            elif err.name == DBUS_UNKNOWN_METHOD:
                self.rules_supported = False
                self._emit("rules", None)

        self._read(names.INTERFACE, "ListRules", None, "(aa{sv})", done)

    def refresh_permissions(self) -> None:
        def done(r: Any, err: CallError | None) -> None:
            self.permissions = dict(r[0]) if err is None else None
            self._emit("permissions", self.permissions)

        self._read(names.INTERFACE, "GetPermissions", None, "(a{ss})", done)

    def get_stats(self, pid: int, cb: Callback) -> None:
        self._read(names.INTERFACE, "GetStats", GLib.Variant("(u)", (pid,)), "(a{sv})",
                   lambda r, e: cb(r[0] if e is None else None, e))

    def start_daemon(self, cb: Callback) -> None:
        """Ask the bus to start the daemon (bus activation, where it is installed)."""
        if self.conn is None:
            cb(None, CallError("no-bus", self.detail or "no connection to the system bus"))
            return
        self.conn.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                       "StartServiceByName", GLib.Variant("(su)", (names.BUS_NAME, 0)), None,
                       Gio.DBusCallFlags.NONE, READ_TIMEOUT_MS, None, self._finish, (cb, None))

    # --- changes (polkit may ask for a password) ----------------------------------------------
    def set_limit(self, pid: int, download: int, upload: int, cb: Callback) -> None:
        self._own_changes[pid] = time.monotonic()
        self._write("SetLimit", GLib.Variant("(utt)", (pid, download, upload)), cb)

    def clear_limit(self, pid: int, cb: Callback) -> None:
        self._own_changes[pid] = time.monotonic()
        self._write("ClearLimit", GLib.Variant("(u)", (pid,)), cb)

    def set_unit_limit(self, unit: str, download: int, upload: int, cb: Callback) -> None:
        self._write("SetUnitLimit", GLib.Variant("(stt)", (unit, download, upload)), cb)

    def clear_unit_limit(self, unit: str, cb: Callback) -> None:
        self._write("ClearUnitLimit", GLib.Variant("(s)", (unit,)), cb)

    def add_rule(self, rule: dict[str, Any], cb: Callback) -> None:
        self._write("AddRule", rule_variant(rule), cb, reply_type="(s)")

    def remove_rule(self, rule_id: str, cb: Callback) -> None:
        self._write("RemoveRule", GLib.Variant("(s)", (rule_id,)), cb)

    def changed_by_us(self, pid: int) -> bool:
        """Whether a limit signal about pid follows a change this applet asked for."""
        t = self._own_changes.get(pid)
        now = time.monotonic()
        for p, when in list(self._own_changes.items()):
            if now - when > OWN_CHANGE_WINDOW_S:
                del self._own_changes[p]
        return t is not None and now - t <= OWN_CHANGE_WINDOW_S

    # --- plumbing -----------------------------------------------------------------------------
    def _read(self, iface: str, member: str, params: GLib.Variant | None,
              reply_type: str | None, cb: Callback) -> None:
        self._call(iface, member, params, reply_type, Gio.DBusCallFlags.NO_AUTO_START,
                   READ_TIMEOUT_MS, cb, stale_check=True)

    def _write(self, member: str, params: GLib.Variant, cb: Callback,
               reply_type: str | None = None) -> None:
        self._call(names.INTERFACE, member, params, reply_type,
                   Gio.DBusCallFlags.ALLOW_INTERACTIVE_AUTHORIZATION, WRITE_TIMEOUT_MS, cb,
                   stale_check=False)

    def _call(self, iface: str, member: str, params: GLib.Variant | None,
              reply_type: str | None, flags: Gio.DBusCallFlags, timeout_ms: int,
              cb: Callback, *, stale_check: bool) -> None:
        if self.conn is None or (stale_check and self.owner is None):
            cb(None, CallError(DBUS_SERVICE_UNKNOWN, "the daemon is not running"))
            return
        rtype = GLib.VariantType.new(reply_type) if reply_type else None
        gen = self._generation if stale_check else None
        self.conn.call(names.BUS_NAME, names.OBJECT_PATH, iface, member, params, rtype, flags,
                       timeout_ms, None, self._finish, (cb, gen))

    def _finish(self, conn: Gio.DBusConnection, res: Gio.AsyncResult, data: tuple) -> None:
        cb, gen = data
        try:
            reply = conn.call_finish(res)
        except GLib.Error as e:
            if gen is not None and gen != self._generation:
                return  # the daemon went away meanwhile
            cb(None, call_error(e))
            return
        if gen is not None and gen != self._generation:
            return
        cb(reply.unpack() if reply is not None else (), None)
