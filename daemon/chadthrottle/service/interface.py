"""The org.chadthrottle.Throttle1 object — translation only, no logic.

Two halves:

* :class:`Throttle1` declares the contract (methods, signals, properties) for dbus-fast, so
  introspection and the Properties interface come from the library, and holds the thin
  translations engine <-> bus values (``serve_*``).
* :class:`Gate` is the *only* dispatcher of method calls on our object: dbus-fast's
  ``@method`` handlers never see the sender, so a message handler intercepts every call to
  our path/interface (with or without the interface field), checks the signature, asks the
  :class:`~chadthrottle.service.polkit.Authorizer`, runs the translation and replies —
  translating every exception in one place (:mod:`chadthrottle.service.errors`).  The
  ``@method`` bodies are unreachable through the gate and fail closed if ever reached.

Reads are answered at once, without asking anyone (issue 7, item 6).  Members that concern
the caller itself (Subscribe, Unsubscribe, GetPermissions) get the caller's unique name —
and its uid, or its permissions from the Authorizer — from the gate.  Stats subscriptions
are kept by :mod:`chadthrottle.service.subscriptions`; here they are only translated into
unicast ``Stats`` signals (a signal message with ``destination=`` the subscriber).
"""

import asyncio
import logging
import time
from dataclasses import dataclass

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast import introspection as intr
from dbus_fast.constants import ErrorType, PropertyAccess
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface, dbus_property, method, signal

from .. import __version__, names, procfs
from ..errors import InvalidRule, NoSuchProcess, NotAuthorized
from .errors import to_dbus_error

log = logging.getLogger("chadthrottle.service")

#: GetStats keys and their D-Bus types: the contract's keys first, then additive extras.
STATS_SIGNATURES: dict[str, str] = {
    "pid": "u",
    "comm": "s",
    "cgroup": "s",
    "download_limit": "t",
    "upload_limit": "t",
    "download_rate": "d",
    "upload_rate": "d",
    "download_bytes": "t",
    "upload_bytes": "t",
    "download_dropped": "t",
    "upload_dropped": "t",
    "program_calls": "t",
    "status": "s",
    # additive (not in contract v1's list, allowed by "only add"):
    "download_packets": "t",
    "upload_packets": "t",
    "download_dropped_bytes": "t",
    "upload_dropped_bytes": "t",
    # what an applet groups rows by (issue 10); emitted when the engine provides them
    "exe": "s",
    "uid": "u",
    "unit": "s",
    "rule": "s",
    # shaping state (issue 8): sockets sharing each direction's rate, the download queue
    "download_sockets": "u",
    "upload_sockets": "u",
    "download_queued": "t",
    "download_queue_dropped": "t",
}
_CASTS = {"u": int, "t": int, "d": float, "s": str, "b": bool}
#: PropertiesChanged carries the Limits value up to this many limits, and only announces
#: the change beyond (clients then Get it)
LIMITS_INLINE = 256

#: names of signal and out arguments (dbus-fast does not name them; the contract does)
SIGNAL_ARG_NAMES = {
    "LimitChanged": ("pid", "download", "upload"),
    "LimitRemoved": ("pid", "reason"),
    "Stats": ("monotonic_ns", "processes"),
}
RULE_SIGNATURES = {**names.RULE_KEY_SIGNATURES, **names.RULE_LIST_SIGNATURES}
OUT_ARG_NAMES = {
    "GetStats": ("stats",),
    "ListLimits": ("limits",),
    "ListProcesses": ("processes",),
    "GetPermissions": ("permissions",),
    "AddRule": ("id",),
    "ListRules": ("rules",),
}


def rule_to_variant_dict(rule, matched: int) -> dict[str, Variant]:
    """A rule (and how many processes it limits) -> a{sv}."""
    out = {k: Variant(RULE_SIGNATURES[k], v) for k, v in rule.to_bus().items()
           if k in RULE_SIGNATURES}
    out["matched"] = Variant("u", matched)
    return out


def rule_from_variant_dict(data) -> dict:
    """a{sv} -> plain values, each checked against the key's contract type (the model checks
    the rest and names the key)."""
    out = {}
    for key, value in data.items():
        sig = RULE_SIGNATURES.get(key)
        if sig is not None and value.signature != sig:
            raise InvalidRule(f"key {key!r}: must be of D-Bus type {sig}, not "
                              f"{value.signature}", key=key)
        out[key] = value.value
    return out


def stats_to_variant_dict(st) -> dict[str, Variant]:
    """ProcessStats -> a{sv}."""
    out = {}
    for key, sig in STATS_SIGNATURES.items():
        value = getattr(st, key, None)
        if value is None:
            continue
        out[key] = Variant(sig, _CASTS[sig](value))
    return out


class _Ungated(DBusError):
    def __init__(self):
        super().__init__(names.ERR_NOT_AUTHORIZED, "call was not routed through the gate")


class Throttle1(ServiceInterface):
    """The exported object.  ``engine`` is a chadthrottle.engine.Engine (opened);
    ``subscriptions`` a :class:`~chadthrottle.service.subscriptions.Subscriptions`;
    ``bus`` the connection unicast Stats signals are sent on; ``on_demand`` is called when
    someone needs fresh samples (a limit was set, rates were read, a subscriber came)."""

    def __init__(self, core, loop: asyncio.AbstractEventLoop | None = None, *,
                 subscriptions=None, bus=None, on_demand=None) -> None:
        super().__init__(names.INTERFACE)
        self._core = core
        engine = self._engine = core.engine
        self._loop = loop
        self._attached: list[str] = list(engine.attached_cgroups)
        self._subs = subscriptions
        self.bus = bus
        self._on_demand = on_demand or (lambda: None)
        self.last_rate_read = float("-inf")  # monotonic time of the last GetStats/ListProcesses
        self._limits_pending = False

    # ----------------------------------------------------------------- translations
    def serve_SetLimit(self, pid: int, download: int, upload: int, *,
                       process: procfs.Process | None = None, caller_uid: int = 0) -> list:
        had = self._engine.limit_of(pid) is not None
        lim = self._core.set_limit(pid, download, upload, process=process,
                                   owner_uid=caller_uid)
        if lim is None:  # "both 0 removes it"
            if had:
                self.LimitRemoved(pid, names.REASON_CLEARED)
        else:
            self.LimitChanged(lim.pid, lim.download, lim.upload)
            self._on_demand()
        self._announce_rules()  # the rules apply again to what an explicit limit freed
        self._limits_changed()
        self._attached_maybe_changed()
        return []

    def serve_ClearLimit(self, pid: int, *, process: procfs.Process | None = None,
                         caller_uid: int = 0) -> list:
        self._core.clear_limit(pid)
        self.LimitRemoved(pid, names.REASON_CLEARED)
        self._announce_rules()
        self._limits_changed()
        return []

    def serve_GetStats(self, pid: int) -> list:
        self._rates_read()
        return [stats_to_variant_dict(self._engine.stats(pid))]

    def serve_ListLimits(self) -> list:
        return [self._engine.limit_rows()]

    def serve_SetUnitLimit(self, unit: str, download: int, upload: int, *,
                           caller_uid: int = 0) -> list:
        self._core.set_unit_limit(unit, download, upload, owner_uid=caller_uid)
        self._on_demand()
        self._attached_maybe_changed()
        return []

    def serve_ClearUnitLimit(self, unit: str, *, caller_uid: int = 0) -> list:
        self._core.clear_unit_limit(unit)
        return []

    # ----------------------------------------------------------------- rules
    def serve_AddRule(self, rule, *, caller_uid: int = 0) -> list:
        rule_id = self._core.add_rule(rule_from_variant_dict(rule))
        self.RulesChanged()
        self._announce_rules()
        self._limits_changed()
        return [rule_id]

    def serve_RemoveRule(self, rule_id: str, *, caller_uid: int = 0) -> list:
        self._core.remove_rule(rule_id)
        self.RulesChanged()
        self._announce_rules()
        self._limits_changed()
        return []

    def serve_ListRules(self) -> list:
        return [[rule_to_variant_dict(r, n) for r, n in self._core.list_rules()]]

    def serve_Reload(self, *, caller_uid: int = 0) -> list:
        self.reload()
        return []

    def reload(self) -> None:
        """Reload, from the bus or from SIGHUP: InvalidRule leaves everything as it was."""
        self._core.reload()
        self.RulesChanged()
        self._announce_rules()
        self._limits_changed()

    def serve_ListProcesses(self) -> list:
        self._rates_read()
        return [self.stats_rows()]

    def stats_rows(self) -> list[dict[str, Variant]]:
        """The rows of ListProcesses and of the Stats signal."""
        return [stats_to_variant_dict(st) for st in self._engine.list_processes()]

    def _rates_read(self) -> None:
        self.last_rate_read = time.monotonic()
        self._on_demand()

    # ----------------------------------------------------------------- the caller's own
    def serve_Subscribe(self, sender: str, uid: int, interval_ms: int) -> list:
        sub = self._subs.subscribe(sender, uid, interval_ms)
        if sub is not None:
            log.info("Stats subscriber %s (uid %d): every %d ms; %d subscriber(s)", sender,
                     uid, sub.interval_ms, len(self._subs))
        return []

    def serve_Unsubscribe(self, sender: str) -> list:
        if self._subs.unsubscribe(sender):
            log.info("Stats subscriber %s unsubscribed; %d subscriber(s)", sender,
                     len(self._subs))
        return []

    def serve_GetPermissions(self, permissions: dict[str, str]) -> list:
        return [dict(permissions)]

    def limit_owner(self, pid: int) -> tuple[str, int] | None:
        """(origin, setter's uid) of the limit on pid, or None: what authorization needs."""
        return self._core.limit_owner(pid)

    def forget_caller(self, name: str) -> None:
        """A unique name left the bus."""
        if self._subs is not None and self._subs.forget(name):
            log.info("Stats subscriber %s left the bus; %d subscriber(s)", name,
                     len(self._subs))

    def send_stats(self, destinations: list[str]) -> int:
        """One ``Stats`` signal to each destination only (unicast); the rows are built once.
        Returns how many were sent."""
        if not destinations or self.bus is None:
            return 0
        rows = self.stats_rows()
        now = time.monotonic_ns()
        sent = 0
        for dest in destinations:
            try:
                self.bus.send(Message(
                    message_type=MessageType.SIGNAL, destination=dest, path=names.OBJECT_PATH,
                    interface=names.INTERFACE, member="Stats", signature="taa{sv}",
                    body=[now, rows]))
                sent += 1
            except Exception:  # the bus is going away; the loop stops with it
                log.debug("could not send Stats to %s", dest, exc_info=True)
        return sent

    # ----------------------------------------------------------------- engine notices
    def announce(self, notices) -> None:
        """Signals for what the engine saw happen (a limit's processes exited; a limit
        moved to a surviving descendant)."""
        for n in notices:
            try:
                if n.kind == "exited":
                    self.LimitRemoved(n.pid, names.REASON_EXITED)
                elif n.kind == "moved":
                    self.LimitRemoved(n.pid, names.REASON_EXITED)
                    lim = self._engine.limit_of(n.other)
                    if lim is not None:
                        self.LimitChanged(lim.pid, lim.download, lim.upload)
            except Exception:  # the bus is going away; the limit is gone all the same
                log.warning("could not announce %s of %d", n.kind, n.pid, exc_info=True)
        self._announce_rules()  # processes rules limited at exec
        if notices:
            self._limits_changed()
        self._attached_maybe_changed()

    def _announce_rules(self) -> None:
        """LimitChanged for each process a rule started limiting (or gave a new rate),
        LimitRemoved "cleared" for each one a rule stopped limiting: what ListLimits shows
        changed, as it does for SetLimit."""
        for kind, pid in self._core.take_rule_changes():
            lim = self._engine.limit_of(pid)
            try:
                if kind == "limited" and lim is not None:
                    self.LimitChanged(pid, lim.download, lim.upload)
                elif kind == "freed" and lim is None:
                    self.LimitRemoved(pid, names.REASON_CLEARED)
            except Exception:  # the bus is going away
                log.warning("could not announce the rule limit of %d", pid, exc_info=True)

    def _limits_changed(self) -> None:
        """Emit PropertiesChanged(Limits) once per turn of the loop, however many limits
        changed in it (a burst of exits is one signal, with the final value)."""
        if self._limits_pending:
            return
        if self._loop is None:
            self._emit_limits()
            return
        self._limits_pending = True
        self._loop.call_soon(self._emit_limits)

    def _emit_limits(self) -> None:
        """The new value while it is small; past LIMITS_INLINE limits the property is
        announced as changed without its value (the standard "invalidated" form): clients
        read it when they need it, and a burst of changes to thousands of limits does not
        send the whole list each time."""
        self._limits_pending = False
        try:
            if self._engine.limit_count() <= LIMITS_INLINE:  # no listing made past that
                rows = self._engine.limit_rows()
                self.emit_properties_changed({"Limits": [list(r) for r in rows]})
            else:
                self.emit_properties_changed({}, ["Limits"])
        except Exception:  # the bus is going away
            log.debug("could not emit PropertiesChanged(Limits)", exc_info=True)

    def _limits_value(self) -> list:
        return [list(r) for r in self._engine.limit_rows()]

    def _attached_maybe_changed(self) -> None:
        now = list(self._engine.attached_cgroups)
        if now != self._attached:
            self._attached = now
            self.emit_properties_changed({"AttachedCgroups": now})

    # ----------------------------------------------------------------- contract
    @method(name="SetLimit")
    def _set_limit(self, pid: "u", download: "t", upload: "t") -> "":  # noqa: F821, F722
        raise _Ungated()

    @method(name="ClearLimit")
    def _clear_limit(self, pid: "u") -> "":  # noqa: F821, F722
        raise _Ungated()

    @method(name="GetStats")
    def _get_stats(self, pid: "u") -> "a{sv}":  # noqa: F821, F722
        raise _Ungated()

    @method(name="ListLimits")
    def _list_limits(self) -> "a(utt)":  # noqa: F821, F722
        raise _Ungated()

    @method(name="SetUnitLimit")
    def _set_unit_limit(self, unit_or_cgroup: "s", download: "t", upload: "t") -> "":  # noqa
        raise _Ungated()

    @method(name="ClearUnitLimit")
    def _clear_unit_limit(self, unit_or_cgroup: "s") -> "":  # noqa: F821, F722
        raise _Ungated()

    @method(name="ListProcesses")
    def _list_processes(self) -> "aa{sv}":  # noqa: F821, F722
        raise _Ungated()

    @method(name="Subscribe")
    def _subscribe(self, interval_ms: "u") -> "":  # noqa: F821, F722
        raise _Ungated()

    @method(name="Unsubscribe")
    def _unsubscribe(self) -> "":  # noqa: F821, F722
        raise _Ungated()

    @method(name="GetPermissions")
    def _get_permissions(self) -> "a{ss}":  # noqa: F821, F722
        raise _Ungated()

    @method(name="AddRule")
    def _add_rule(self, rule: "a{sv}") -> "s":  # noqa: F821, F722
        raise _Ungated()

    @method(name="RemoveRule")
    def _remove_rule(self, id: "s") -> "":  # noqa: F821, F722, A002
        raise _Ungated()

    @method(name="ListRules")
    def _list_rules(self) -> "aa{sv}":  # noqa: F821, F722
        raise _Ungated()

    @method(name="Reload")
    def _reload(self) -> "":  # noqa: F821, F722
        raise _Ungated()

    @signal()
    def RulesChanged(self) -> "":  # noqa: F821, F722
        return None

    @signal()
    def LimitChanged(self, pid, download, upload) -> "utt":  # noqa: F821, F722
        return [pid, download, upload]

    @signal()
    def LimitRemoved(self, pid, reason) -> "us":  # noqa: F821, F722
        return [pid, reason]

    @signal(name="Stats")
    def _stats_signal(self, monotonic_ns, processes) -> "taa{sv}":  # noqa: F821, F722
        """Declared for introspection only: calling it would broadcast.  Stats is sent to
        each subscriber alone by :meth:`send_stats`."""
        raise _Ungated()

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":  # noqa: F821, F722
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def AttachedCgroups(self) -> "as":  # noqa: F821, F722
        return list(self._engine.attached_cgroups)

    @dbus_property(access=PropertyAccess.READ)
    def Limits(self) -> "a(utt)":  # noqa: F821, F722
        return self._limits_value()

    def introspect(self) -> intr.Interface:
        iface = super().introspect()
        for sig in iface.signals:
            for arg, name in zip(sig.args, SIGNAL_ARG_NAMES.get(sig.name, ()), strict=False):
                arg.name = name
        for m in iface.methods:
            for arg, name in zip(m.out_args, OUT_ARG_NAMES.get(m.name, ()), strict=False):
                arg.name = name
        return iface


# --------------------------------------------------------------------------- the gate
@dataclass(frozen=True)
class Member:
    name: str
    in_sig: str
    out_sig: str
    mutating: bool
    #: what the gate hands the translation before the arguments: "" nothing (reads and
    #: authorized changes), "sender" the caller's unique name, "sender+uid" and its uid,
    #: "permissions" the caller's permissions from the Authorizer
    caller: str = ""


MEMBERS: dict[str, Member] = {
    m.name: m
    for m in (
        Member("SetLimit", "utt", "", True),
        Member("ClearLimit", "u", "", True),
        Member("GetStats", "u", "a{sv}", False),
        Member("ListLimits", "", "a(utt)", False),
        Member("SetUnitLimit", "stt", "", True),
        Member("ClearUnitLimit", "s", "", True),
        Member("ListProcesses", "", "aa{sv}", False),
        Member("Subscribe", "u", "", False, caller="sender+uid"),
        Member("Unsubscribe", "", "", False, caller="sender"),
        Member("GetPermissions", "", "a{ss}", False, caller="permissions"),
        Member("AddRule", "a{sv}", "s", True),
        Member("RemoveRule", "s", "", True),
        Member("ListRules", "", "aa{sv}", False),
        Member("Reload", "", "", True),
    )
}
#: mutating members that change rules (polkit: manage-rules), not a process or a unit
RULE_MEMBERS = frozenset({"AddRule", "RemoveRule", "Reload"})


class Gate:
    """Message handler that authorizes and dispatches every call on our object."""

    def __init__(self, bus, iface: Throttle1, authorizer) -> None:
        self._bus = bus
        self._iface = iface
        self._auth = authorizer
        self._tasks: set[asyncio.Task] = set()
        #: method calls on our object per member, however they ended (for the metrics)
        self.calls: dict[str, int] = {}

    def __call__(self, msg: Message):
        if msg.message_type is MessageType.SIGNAL:
            self._on_signal(msg)
            return None  # the library may want it too
        if msg.message_type is not MessageType.METHOD_CALL or msg.path != names.OBJECT_PATH:
            return None
        if msg.interface is not None and msg.interface != names.INTERFACE:
            return None  # Introspectable / Properties / Peer: the library's read-only handlers
        member = MEMBERS.get(msg.member)
        if member is None:
            return None  # not ours: the library answers (UnknownMethod, Introspect, ...)
        self.calls[member.name] = self.calls.get(member.name, 0) + 1
        wants_reply = not (msg.flags & MessageFlag.NO_REPLY_EXPECTED)
        if msg.signature != member.in_sig:
            if not wants_reply:
                return True
            return Message.new_error(
                msg,
                ErrorType.INVALID_ARGS.value,
                f"{member.name} takes ({member.in_sig}), got ({msg.signature})",
            )
        if member.caller in ("", "sender") and not member.mutating:
            # reads are open: answered at once, no polkit or bus round trip (issue 7, 6)
            extra = (msg.sender,) if member.caller else ()
            reply = self._reply(msg, member, *extra)
            return reply if wants_reply else True
        serve = self._serve_caller if member.caller else self._serve
        task = asyncio.get_running_loop().create_task(serve(msg, member, wants_reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _on_signal(self, msg: Message) -> None:
        """NameOwnerChanged from the bus driver itself (the sender is checked: anyone can
        send a signal with that name): a unique name that left is forgotten."""
        if (msg.sender == names.BUS_DRIVER and msg.member == "NameOwnerChanged"
                and msg.interface == names.BUS_DRIVER and msg.signature == "sss"):
            name, _old, new = msg.body
            if name.startswith(":") and not new:
                self._iface.forget_caller(name)
                self._auth.forget(name)

    async def _serve_caller(self, msg: Message, member: Member, wants_reply: bool) -> None:
        """A member about the caller itself: its uid or permissions come from the bus and
        polkit (asynchronously), then the translation runs."""
        try:
            if not msg.sender:
                raise NotAuthorized("the message has no sender")
            if member.caller == "sender+uid":
                extra: tuple = (msg.sender, await self._auth.caller_uid(msg.sender))
            elif member.caller == "permissions":
                extra = (await self._auth.permissions(msg.sender),)
            else:
                extra = (msg.sender,)
        except Exception as exc:  # noqa: BLE001 - translated in the one place
            err = to_dbus_error(exc, member=member.name)
            reply = Message.new_error(msg, err.type, err.text)
        else:
            reply = self._reply(msg, member, *extra)
        if wants_reply:
            self._bus.send(reply)

    def _reply(self, msg: Message, member: Member, *extra, **kw) -> Message:
        """Run the translation of an authorized call; the reply or the translated error."""
        try:
            body = getattr(self._iface, "serve_" + member.name)(*extra, *msg.body, **kw)
            return Message.new_method_return(msg, member.out_sig, body)
        except Exception as exc:  # noqa: BLE001 - translated in the one place
            err = to_dbus_error(exc, member=member.name)
            log.debug("%s from %s -> %s: %s", member.name, msg.sender, err.type, err.text)
            return Message.new_error(msg, err.type, err.text)

    async def _serve(self, msg: Message, member: Member, wants_reply: bool) -> None:
        """A change: authorized first, then made.  A process is opened (pidfd) before it is
        authorized, its owner read through that handle, and the change made on that very
        handle, after checking it still is the same process (issue 7, item 7)."""
        proc: procfs.Process | None = None
        try:
            interactive = bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
            kw: dict = {}
            if member.name in RULE_MEMBERS:
                uid = await self._auth.authorize_change(msg.sender, rules=True,
                                                        interactive=interactive)
            elif member.in_sig.startswith("u"):
                pid = int(msg.body[0])
                try:
                    proc = procfs.open_process(pid)
                except NoSuchProcess:
                    # no such process (or pid 0, a kernel thread): only root or limit-any
                    # gets as far as the engine, which names the error (a bad rate first)
                    proc = None
                target_uid = proc.uid() if proc is not None else None
                uid = await self._auth.authorize_change(
                    msg.sender, pid=pid, target_uid=target_uid,
                    limit=self._iface.limit_owner(pid), interactive=interactive)
                if proc is not None and not proc.alive():
                    raise NoSuchProcess(f"process {pid} exited")
                kw["process"] = proc
            elif member.in_sig.startswith("s"):
                uid = await self._auth.authorize_change(
                    msg.sender, unit=str(msg.body[0]), interactive=interactive)
            else:  # pragma: no cover - every mutating member names a target
                raise NotAuthorized("default deny")
            kw["caller_uid"] = uid
        except Exception as exc:  # noqa: BLE001 - translated in the one place
            err = to_dbus_error(exc, member=member.name)
            log.debug("%s from %s -> %s: %s", member.name, msg.sender, err.type, err.text)
            reply = Message.new_error(msg, err.type, err.text)
        else:
            reply = self._reply(msg, member, **kw)
        finally:
            if proc is not None:
                proc.close()
        if wants_reply:
            self._bus.send(reply)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

