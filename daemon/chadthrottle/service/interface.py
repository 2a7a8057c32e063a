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
"""

import asyncio
import logging
from dataclasses import dataclass

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast import introspection as intr
from dbus_fast.constants import ErrorType, PropertyAccess
from dbus_fast.errors import DBusError
from dbus_fast.service import ServiceInterface, dbus_property, method, signal

from .. import __version__, names
from ..errors import NotAuthorized
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
}
_CASTS = {"u": int, "t": int, "d": float, "s": str}

#: names of signal and out arguments (dbus-fast does not name them; the contract does)
SIGNAL_ARG_NAMES = {
    "LimitChanged": ("pid", "download", "upload"),
    "LimitRemoved": ("pid", "reason"),
}
OUT_ARG_NAMES = {
    "GetStats": ("stats",),
    "ListLimits": ("limits",),
    "ListProcesses": ("processes",),
}


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
    """The exported object.  ``engine`` is a chadthrottle.engine.Engine (opened)."""

    def __init__(self, engine, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(names.INTERFACE)
        self._engine = engine
        self._loop = loop
        self._pidfds: dict[int, int] = {}  # limited pid -> engine's pidfd watched by the loop
        self._attached: list[str] = []

    # ----------------------------------------------------------------- translations
    def serve_SetLimit(self, pid: int, download: int, upload: int) -> list:
        # the engine owns the pidfd and may close it here: stop watching it first
        was_watched = self._unwatch(pid)
        try:
            lim = self._engine.set_limit(pid, download, upload)
        except Exception:
            if was_watched:
                self._watch(pid)
            raise
        if lim is None or (lim.download == 0 and lim.upload == 0):
            # "both 0 removes it"
            if was_watched:
                self.LimitRemoved(pid, names.REASON_CLEARED)
        else:
            self._watch(pid)
            self.LimitChanged(lim.pid, lim.download, lim.upload)
        self._attached_maybe_changed()
        return []

    def serve_ClearLimit(self, pid: int) -> list:
        was_watched = self._unwatch(pid)
        try:
            self._engine.clear_limit(pid)
        except Exception:
            if was_watched:
                self._watch(pid)
            raise
        self.LimitRemoved(pid, names.REASON_CLEARED)
        return []

    def serve_GetStats(self, pid: int) -> list:
        return [stats_to_variant_dict(self._engine.stats(pid))]

    def serve_ListLimits(self) -> list:
        return [[[lim.pid, lim.download, lim.upload] for lim in self._engine.list_limits()]]

    def serve_SetUnitLimit(self, unit: str, download: int, upload: int) -> list:
        self._engine.set_unit_limit(unit, download, upload)
        self._attached_maybe_changed()
        return []

    def serve_ClearUnitLimit(self, unit: str) -> list:
        self._engine.clear_unit_limit(unit)
        return []

    def serve_ListProcesses(self) -> list:
        return [[stats_to_variant_dict(st) for st in self._engine.list_processes()]]

    # ----------------------------------------------------------------- process exit
    def _watch(self, pid: int) -> None:
        if pid in self._pidfds or self._loop is None:
            return
        try:
            # the engine's pidfd (no duplicate: 10,000 limits must fit RLIMIT_NOFILE); it is
            # unwatched before every engine call that may close it, and reap() only closes
            # fds of processes that exited, with no fd opened before we unwatch them
            fd = self._engine.limit_pidfd(pid)
        except Exception:  # the periodic reap() still catches the exit
            log.debug("no pidfd for %d", pid, exc_info=True)
            return
        self._pidfds[pid] = fd
        self._loop.add_reader(fd, self._on_exit, pid)

    def _unwatch(self, pid: int) -> bool:
        fd = self._pidfds.pop(pid, None)
        if fd is None:
            return False
        if self._loop is not None:
            self._loop.remove_reader(fd)
        return True

    def reap(self) -> list[int]:
        """Drop limits of exited processes and announce them (LimitRemoved "exited")."""
        gone = self._engine.reap()
        for pid in gone:
            self._unwatch(pid)
            try:
                self.LimitRemoved(pid, names.REASON_EXITED)
            except Exception:  # the bus is going away; the limit is gone all the same
                log.warning("could not announce the exit of %d", pid, exc_info=True)
        return gone

    def _on_exit(self, pid: int) -> None:
        """A watched pidfd turned readable: the process exited."""
        try:
            self.reap()
        finally:
            # a pidfd stays readable after the exit: never leave its reader spinning
            self._unwatch(pid)

    def unwatch_all(self) -> None:
        for pid in list(self._pidfds):
            self._unwatch(pid)

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

    @signal()
    def LimitChanged(self, pid, download, upload) -> "utt":  # noqa: F821, F722
        return [pid, download, upload]

    @signal()
    def LimitRemoved(self, pid, reason) -> "us":  # noqa: F821, F722
        return [pid, reason]

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":  # noqa: F821, F722
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def AttachedCgroups(self) -> "as":  # noqa: F821, F722
        return list(self._engine.attached_cgroups)

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
    )
}


class Gate:
    """Message handler that authorizes and dispatches every call on our object."""

    def __init__(self, bus, iface: Throttle1, authorizer) -> None:
        self._bus = bus
        self._iface = iface
        self._auth = authorizer
        self._tasks: set[asyncio.Task] = set()

    def __call__(self, msg: Message):
        if msg.message_type is not MessageType.METHOD_CALL or msg.path != names.OBJECT_PATH:
            return None
        if msg.interface is not None and msg.interface != names.INTERFACE:
            return None  # Introspectable / Properties / Peer: the library's read-only handlers
        member = MEMBERS.get(msg.member)
        if member is None:
            return None  # not ours: the library answers (UnknownMethod, Introspect, ...)
        wants_reply = not (msg.flags & MessageFlag.NO_REPLY_EXPECTED)
        if msg.signature != member.in_sig:
            if not wants_reply:
                return True
            return Message.new_error(
                msg,
                ErrorType.INVALID_ARGS.value,
                f"{member.name} takes ({member.in_sig}), got ({msg.signature})",
            )
        if not member.mutating:
            # reads are open: answered at once, no polkit or bus round trip (issue 7, 6)
            reply = self._reply(msg, member)
            return reply if wants_reply else True
        task = asyncio.get_running_loop().create_task(self._serve(msg, member, wants_reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _reply(self, msg: Message, member: Member) -> Message:
        """Run the translation of an authorized call; the reply or the translated error."""
        try:
            body = getattr(self._iface, "serve_" + member.name)(*msg.body)
            return Message.new_method_return(msg, member.out_sig, body)
        except Exception as exc:  # noqa: BLE001 - translated in the one place
            err = to_dbus_error(exc, member=member.name)
            log.debug("%s from %s -> %s: %s", member.name, msg.sender, err.type, err.text)
            return Message.new_error(msg, err.type, err.text)

    async def _serve(self, msg: Message, member: Member, wants_reply: bool) -> None:
        try:
            interactive = bool(msg.flags & MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION)
            if member.in_sig.startswith("u"):
                await self._auth.authorize_change(
                    msg.sender, pid=int(msg.body[0]), interactive=interactive)
            elif member.in_sig.startswith("s"):
                await self._auth.authorize_change(
                    msg.sender, unit=str(msg.body[0]), interactive=interactive)
            else:  # pragma: no cover - every mutating member names a target
                raise NotAuthorized("default deny")
        except Exception as exc:  # noqa: BLE001 - translated in the one place
            err = to_dbus_error(exc, member=member.name)
            log.debug("%s from %s -> %s: %s", member.name, msg.sender, err.type, err.text)
            reply = Message.new_error(msg, err.type, err.text)
        else:
            reply = self._reply(msg, member)
        if wants_reply:
            self._bus.send(reply)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

