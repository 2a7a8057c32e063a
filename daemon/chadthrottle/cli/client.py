"""A thin asyncio client of the org.chadthrottle.Throttle1 contract (DESIGN.md §2).

Only the bus: it never imports the engine or the service.  Messages are built by hand
(no introspection round trip), and every failure becomes a :class:`DaemonError` whose
message is meant for people and whose ``name`` is the D-Bus error name (or a pseudo
name for failures that never reached the bus).

Signals are taken from the daemon only (issue 7, item 10): :class:`StatsFeed` matches on
``sender='org.chadthrottle.Throttle1'`` and checks that each message's sender is the unique
name that owns the bus name now (GetNameOwner, then NameOwnerChanged — itself accepted only
from the bus driver), so no other connection can feed it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

from dbus_fast import BusType, DBusError, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from chadthrottle import names

# Errors that never reached the daemon get names in this namespace so that scripts can
# still match on one stable string.
CLIENT_ERROR_PREFIX = "org.chadthrottle.Throttle1.Client."
ERR_NO_BUS = CLIENT_ERROR_PREFIX + "NoBus"
ERR_TIMEOUT = CLIENT_ERROR_PREFIX + "Timeout"

DBUS_SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"
DBUS_NAME_HAS_NO_OWNER = "org.freedesktop.DBus.Error.NameHasNoOwner"
DBUS_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
DBUS_NO_REPLY = "org.freedesktop.DBus.Error.NoReply"
DBUS_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
DBUS_SPAWN_PREFIX = "org.freedesktop.DBus.Error.Spawn."

START_HINT = ("start it with 'sudo systemctl start chadthrottled' "
              "(or 'sudo make run' from a checkout)")

#: the keys AddRule takes: the rule keys, and ``id`` to choose (or replace) a rule
ADD_RULE_SIGNATURES: dict[str, str] = {"id": names.RULE_LIST_SIGNATURES["id"],
                                       **names.RULE_KEY_SIGNATURES}

READ_TIMEOUT = 25.0
# a mutating call may wait for an interactive polkit prompt
WRITE_TIMEOUT = 120.0


class DaemonError(Exception):
    """A failed call: `name` is the D-Bus error name, str() the plain explanation."""

    def __init__(self, name: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.name = name
        self.message = message
        self.detail = detail


def explain(name: str, text: str, *, pid: int | None = None, unit: str | None = None,
            rule: str | None = None, action: str | None = None) -> str:
    """Turn a D-Bus error into one plain sentence (pure; unit-tested).  ``action`` is the
    polkit action the call needed, when it is not one of the limit actions."""
    text = (text or "").strip()
    what = f"process {pid}" if pid is not None else (f"unit {unit!r}" if unit else "target")
    if (name == names.ERR_NOT_AUTHORIZED or name == DBUS_ACCESS_DENIED) and action:
        return (f"not authorized{': ' + text if text else ''}. This needs the polkit action "
                f"{action} (or run as root)")
    if name == names.ERR_INVALID_RULE:
        return f"invalid rule: {text}" if text else "invalid rule"
    if name == names.ERR_NO_SUCH_RULE:
        return f"no such rule: {text}" if text else f"no such rule: {rule!r}"
    if name == DBUS_UNKNOWN_METHOD:
        return (f"the running chadthrottled does not know this call (is it older than this "
                f"client?): {text}")
    if name in (DBUS_SERVICE_UNKNOWN, DBUS_NAME_HAS_NO_OWNER) or name.startswith(DBUS_SPAWN_PREFIX):
        return f"the chadthrottled daemon is not running on the system bus; {START_HINT}"
    if name == ERR_NO_BUS:
        return (f"cannot reach the D-Bus system bus ({text}), so the chadthrottled daemon "
                f"cannot be running; {START_HINT} — 'make run' starts a private bus when there "
                f"is none and prints the DBUS_SYSTEM_BUS_ADDRESS to export")
    if name == ERR_TIMEOUT:
        return f"the daemon did not answer in time ({text})"
    if name == names.ERR_NOT_AUTHORIZED or name == DBUS_ACCESS_DENIED:
        return (
            f"not authorized{': ' + text if text else ''}. Limiting your own processes needs the "
            f"polkit action {names.POLKIT_ACTION_LIMIT_OWN}, other users' processes need "
            f"{names.POLKIT_ACTION_LIMIT_ANY} (or run as root)"
        )
    if name == names.ERR_NO_SUCH_PROCESS:
        return f"no such process: {text}" if text else \
            f"no such process: {what} does not exist or is a kernel thread"
    if name == names.ERR_NO_SUCH_LIMIT:
        return f"{what} has no limit"
    if name == names.ERR_NO_SUCH_UNIT:
        return f"no such unit or cgroup: {text}" if text else \
            f"no such unit or cgroup: {unit!r}"
    if name == names.ERR_INVALID_LIMIT:
        return f"invalid limit: {text}" if text else "invalid limit"
    if name == names.ERR_UNSUPPORTED:
        return f"this kernel or cgroup setup cannot do it: {text}"
    if name == names.ERR_FAILED:
        return f"the daemon failed unexpectedly ({text}); see 'journalctl -u chadthrottled'"
    return text or name


def rule_variants(rule: Mapping[str, Any]) -> dict[str, Variant]:
    """The a{sv} of AddRule: each key in its contract type (``uid`` u, rates t, booleans b,
    strings s; ``id`` s).  An unknown key is a ValueError (the CLI never sends one)."""
    out: dict[str, Variant] = {}
    for key, value in rule.items():
        signature = ADD_RULE_SIGNATURES.get(key)
        if signature is None:
            raise ValueError(f"not a rule key: {key!r}")
        if signature == "b" and not isinstance(value, bool):
            raise ValueError(f"rule key {key!r} must be a boolean")
        if signature in ("u", "t") and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"rule key {key!r} must be an integer")
        if signature == "s" and not isinstance(value, str):
            raise ValueError(f"rule key {key!r} must be a string")
        out[key] = Variant(signature, value)
    return out


def _plain(value: Any) -> Any:
    """Variants and dbus containers -> plain Python (JSON-ready)."""
    if isinstance(value, Variant):
        return _plain(value.value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Client:
    """``async with Client() as c: await c.get_stats(pid)``."""

    def __init__(self, address: str | None = None) -> None:
        self._address = address
        self._bus: MessageBus | None = None

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def connect(self) -> None:
        try:
            if self._address:
                bus = MessageBus(bus_address=self._address)
            else:
                bus = MessageBus(bus_type=BusType.SYSTEM)
            self._bus = await asyncio.wait_for(bus.connect(), READ_TIMEOUT)
        except TimeoutError as e:
            raise DaemonError(ERR_NO_BUS, explain(ERR_NO_BUS, "timed out connecting")) from e
        except Exception as e:  # OSError, AuthError, InvalidAddressError
            address = self._address or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or \
                "unix:path=/var/run/dbus/system_bus_socket"
            raise DaemonError(ERR_NO_BUS, explain(ERR_NO_BUS, f"{address}: {e}")) from e

    def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None

    async def _call(self, member: str, signature: str = "", body: list | None = None, *,
                    write: bool = False, pid: int | None = None, unit: str | None = None,
                    rule: str | None = None, action: str | None = None,
                    interface: str = names.INTERFACE) -> list:
        assert self._bus is not None, "connect() first"
        msg = Message(
            destination=names.BUS_NAME,
            path=names.OBJECT_PATH,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
            flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if write else MessageFlag.NONE,
        )
        timeout = WRITE_TIMEOUT if write else READ_TIMEOUT
        try:
            reply = await asyncio.wait_for(self._bus.call(msg), timeout)
        except TimeoutError as e:
            why = explain(ERR_TIMEOUT, f"{member}, {timeout:.0f} s")
            raise DaemonError(ERR_TIMEOUT, why) from e
        except DBusError as e:  # pragma: no cover - dbus-fast returns errors as messages
            raise DaemonError(e.type, explain(e.type, e.text, pid=pid, unit=unit, rule=rule,
                                              action=action), e.text) from e
        except (OSError, EOFError) as e:
            raise DaemonError(ERR_NO_BUS, explain(ERR_NO_BUS, str(e))) from e
        if reply.message_type == MessageType.ERROR:
            name = reply.error_name or "org.freedesktop.DBus.Error.Failed"
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise DaemonError(name, explain(name, text, pid=pid, unit=unit, rule=rule,
                                            action=action), text)
        return reply.body

    # --- the contract -------------------------------------------------------------------------
    async def set_limit(self, pid: int, download: int, upload: int) -> None:
        await self._call("SetLimit", "utt", [pid, download, upload], write=True, pid=pid)

    async def clear_limit(self, pid: int) -> None:
        await self._call("ClearLimit", "u", [pid], write=True, pid=pid)

    async def get_stats(self, pid: int) -> dict[str, Any]:
        (stats,) = await self._call("GetStats", "u", [pid], pid=pid)
        return _plain(stats)

    async def list_limits(self) -> list[tuple[int, int, int]]:
        (limits,) = await self._call("ListLimits")
        return [(int(p), int(d), int(u)) for p, d, u in limits]

    async def set_unit_limit(self, unit: str, download: int, upload: int) -> None:
        await self._call("SetUnitLimit", "stt", [unit, download, upload], write=True, unit=unit)

    async def clear_unit_limit(self, unit: str) -> None:
        await self._call("ClearUnitLimit", "s", [unit], write=True, unit=unit)

    async def list_processes(self) -> list[dict[str, Any]]:
        (procs,) = await self._call("ListProcesses")
        return [_plain(p) for p in procs]

    async def get_property(self, prop: str) -> Any:
        (value,) = await self._call("Get", "ss", [names.INTERFACE, prop],
                                    interface="org.freedesktop.DBus.Properties")
        return _plain(value)

    # --- rules (DESIGN.md §2b) ----------------------------------------------------------------
    async def add_rule(self, rule: Mapping[str, Any]) -> str:
        """AddRule(a{sv}) -> the rule's id."""
        (rule_id,) = await self._call("AddRule", "a{sv}", [rule_variants(rule)], write=True,
                                      rule=rule.get("id"),
                                      action=names.POLKIT_ACTION_MANAGE_RULES)
        return str(rule_id)

    async def remove_rule(self, rule_id: str) -> None:
        await self._call("RemoveRule", "s", [rule_id], write=True, rule=rule_id,
                         action=names.POLKIT_ACTION_MANAGE_RULES)

    async def list_rules(self) -> list[dict[str, Any]]:
        (rules,) = await self._call("ListRules")
        return [_plain(r) for r in rules]

    async def reload(self) -> None:
        """Reload: the daemon re-reads its permanent rules."""
        await self._call("Reload", write=True, action=names.POLKIT_ACTION_MANAGE_RULES)

    async def subscribe(self, interval_ms: int) -> None:
        await self._call("Subscribe", "u", [interval_ms])

    async def unsubscribe(self) -> None:
        await self._call("Unsubscribe")

    async def get_permissions(self) -> dict[str, str]:
        (perms,) = await self._call("GetPermissions")
        return {str(k): str(v) for k, v in perms.items()}

    # --- the bus driver ---------------------------------------------------------------------
    async def _driver(self, member: str, signature: str = "", body: list | None = None) -> list:
        assert self._bus is not None, "connect() first"
        reply = await asyncio.wait_for(self._bus.call(Message(
            destination=names.BUS_DRIVER, path=names.BUS_DRIVER_PATH,
            interface=names.BUS_DRIVER, member=member, signature=signature,
            body=body or [])), READ_TIMEOUT)
        if reply.message_type == MessageType.ERROR:
            name = reply.error_name or "org.freedesktop.DBus.Error.Failed"
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise DaemonError(name, explain(name, text), text)
        return reply.body

    async def daemon_owner(self) -> str:
        """The unique name that owns org.chadthrottle.Throttle1 now."""
        (owner,) = await self._driver("GetNameOwner", "s", [names.BUS_NAME])
        return str(owner)


STATS_RULE = (f"type='signal',sender='{names.BUS_NAME}',path='{names.OBJECT_PATH}',"
              f"interface='{names.INTERFACE}',member='Stats'")
OWNER_RULE = (f"type='signal',sender='{names.BUS_DRIVER}',path='{names.BUS_DRIVER_PATH}',"
              f"interface='{names.BUS_DRIVER}',member='NameOwnerChanged',"
              f"arg0='{names.BUS_NAME}'")


class StatsFeed:
    """The daemon's ``Stats`` signals for this connection (Subscribe … Unsubscribe).

    ``async with StatsFeed(client, 1000) as feed: rows = await feed.next()``.  Only
    signals whose sender is the current owner of org.chadthrottle.Throttle1 are taken;
    when the daemon restarts (a new owner), the feed subscribes again.
    """

    def __init__(self, client: Client, interval_ms: int) -> None:
        self._client = client
        self._interval_ms = interval_ms
        self._owner: str | None = None
        self._latest: asyncio.Queue[list[dict[str, Any]]] = asyncio.Queue(maxsize=1)
        self._resubscribe: asyncio.Task | None = None
        self.ignored = 0  # signals from anyone else (counted, never used)

    async def __aenter__(self) -> StatsFeed:
        bus = self._client._bus
        assert bus is not None, "connect() first"
        bus.add_message_handler(self._on_message)
        try:
            await self._client._driver("AddMatch", "s", [OWNER_RULE])
            await self._client._driver("AddMatch", "s", [STATS_RULE])
            try:
                self._owner = await self._client.daemon_owner()
            except DaemonError as e:
                raise DaemonError(e.name, explain(DBUS_NAME_HAS_NO_OWNER, ""), e.detail) from e
            await self._client.subscribe(self._interval_ms)
        except BaseException:
            bus.remove_message_handler(self._on_message)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        bus = self._client._bus
        if bus is None:
            return
        bus.remove_message_handler(self._on_message)
        if self._resubscribe is not None:
            self._resubscribe.cancel()
        if bus.connected:
            for call in (self._client.unsubscribe(),
                         self._client._driver("RemoveMatch", "s", [STATS_RULE]),
                         self._client._driver("RemoveMatch", "s", [OWNER_RULE])):
                try:
                    await call
                except (DaemonError, TimeoutError, OSError, EOFError):
                    pass

    def _on_message(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return None
        if (msg.member == "NameOwnerChanged" and msg.sender == names.BUS_DRIVER
                and msg.interface == names.BUS_DRIVER and msg.signature == "sss"
                and msg.body[0] == names.BUS_NAME):
            self._owner = msg.body[2] or None
            if self._owner:  # the daemon came back: subscribe again
                self._resubscribe = asyncio.ensure_future(self._subscribe_again())
            return None
        if msg.member == "Stats" and msg.interface == names.INTERFACE:
            if self._owner is None or msg.sender != self._owner \
                    or msg.path != names.OBJECT_PATH or msg.signature != "taa{sv}":
                self.ignored += 1
                return None
            rows = [_plain(r) for r in msg.body[1]]
            if self._latest.full():
                self._latest.get_nowait()  # only the newest matters
            self._latest.put_nowait(rows)
        return None

    async def _subscribe_again(self) -> None:
        try:
            await self._client.subscribe(self._interval_ms)
        except DaemonError:
            pass

    async def next(self) -> list[dict[str, Any]]:
        """The rows of the next Stats signal (the newest, if several arrived)."""
        return await self._latest.get()
