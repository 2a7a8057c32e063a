"""Authorization of bus callers: uid from the bus, polkit for everyone but root.

Rules (DESIGN §2):
* the caller's uid comes from the bus daemon (GetConnectionUnixUser), never from an argument;
* uid 0 may do everything;
* any other caller needs polkit's consent: ``limit-own`` for a process running under the
  caller's own uid, ``limit-any`` for anything else (another user's process, a process
  whose owner cannot be read, a whole unit/cgroup), ``read`` for GetStats/ListProcesses;
* without a reachable polkit, only uid 0 may change limits (reads stay open);
* anything that is not explicitly allowed is denied.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from dbus_fast import Message, MessageType, Variant
from dbus_fast.errors import DBusError

from .. import names
from ..errors import NotAuthorized

log = logging.getLogger("chadthrottle.polkit")

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_PATH = "/org/freedesktop/PolicyKit1/Authority"
POLKIT_INTERFACE = "org.freedesktop.PolicyKit1.Authority"
CHECK_ALLOW_USER_INTERACTION = 0x1
# polkit is "not reachable" when the bus answers with one of these instead of polkit itself
_UNREACHABLE = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
    "org.freedesktop.DBus.Error.NoReply",
    "org.freedesktop.DBus.Error.Disconnected",
    "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
    "org.freedesktop.DBus.Error.Spawn.ChildExited",
    "org.freedesktop.DBus.Error.TimedOut",
    "org.freedesktop.DBus.Error.AccessDenied",
}
NONINTERACTIVE_TIMEOUT = 10.0
INTERACTIVE_TIMEOUT = 120.0


class PolkitUnavailable(Exception):
    """polkit could not be asked (not running, not installed, no answer)."""


def process_uid(pid: int) -> int | None:
    """Real uid of ``pid``, or None when the process does not exist or cannot be read."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def action_for(caller_uid: int, target_uid: int | None) -> str:
    """The polkit action a non-root caller needs to change a limit on a target."""
    if target_uid is not None and target_uid == caller_uid:
        return names.POLKIT_ACTION_LIMIT_OWN
    return names.POLKIT_ACTION_LIMIT_ANY


class Authorizer:
    """Answers "may this bus caller do this?" — raises NotAuthorized when not."""

    def __init__(self, bus, *, uid_cache_size: int = 4096) -> None:
        self._bus = bus
        # unique bus names are never reused during the bus's lifetime: caching is safe
        self._uids: OrderedDict[str, int] = OrderedDict()
        self._uid_cache_size = uid_cache_size

    async def caller_uid(self, sender: str | None) -> int:
        if not sender:
            raise NotAuthorized("the message has no sender")
        uid = self._uids.get(sender)
        if uid is not None:
            return uid
        reply = await self._bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="GetConnectionUnixUser",
                signature="s",
                body=[sender],
            )
        )
        if reply.message_type is not MessageType.METHOD_RETURN:
            raise NotAuthorized(f"cannot identify the caller {sender}: {reply.error_name}")
        uid = int(reply.body[0])
        self._uids[sender] = uid
        if len(self._uids) > self._uid_cache_size:
            self._uids.popitem(last=False)
        return uid

    async def check_polkit(
        self, sender: str, action: str, details: dict[str, str], *, interactive: bool
    ) -> bool:
        """True/False from polkit's CheckAuthorization; PolkitUnavailable if it can't answer."""
        subject = ["system-bus-name", {"name": Variant("s", sender)}]
        msg = Message(
            destination=POLKIT_NAME,
            path=POLKIT_PATH,
            interface=POLKIT_INTERFACE,
            member="CheckAuthorization",
            signature="(sa{sv})sa{ss}us",
            body=[
                subject,
                action,
                details,
                CHECK_ALLOW_USER_INTERACTION if interactive else 0,
                "",
            ],
        )
        timeout = INTERACTIVE_TIMEOUT if interactive else NONINTERACTIVE_TIMEOUT
        try:
            reply = await asyncio.wait_for(self._bus.call(msg), timeout)
        except TimeoutError as e:
            raise PolkitUnavailable(f"no answer from polkit within {timeout:.0f} s") from e
        except DBusError as e:  # pragma: no cover - bus.call returns errors as messages
            raise PolkitUnavailable(str(e)) from e
        if reply.message_type is MessageType.ERROR:
            if reply.error_name in _UNREACHABLE:
                text = reply.body[0] if reply.body else ""
                raise PolkitUnavailable(f"{reply.error_name}: {text}")
            log.warning("polkit refused %s for %s: %s %s", action, sender, reply.error_name,
                        reply.body)
            return False
        is_authorized, is_challenge, _details = reply.body[0]
        log.debug("polkit %s for %s: authorized=%s challenge=%s", action, sender,
                  is_authorized, is_challenge)
        return bool(is_authorized)

    async def authorize_change(
        self, sender: str | None, *, pid: int | None = None, unit: str | None = None,
        interactive: bool = False,
    ) -> int:
        """Authorize a mutating call; returns the caller's uid or raises NotAuthorized."""
        uid = await self.caller_uid(sender)
        if uid == 0:
            return uid
        if pid is not None:
            target_uid = process_uid(pid)
            action = action_for(uid, target_uid)
            details = {"pid": str(pid)}
            if target_uid is not None:
                details["target_uid"] = str(target_uid)
        else:
            action = names.POLKIT_ACTION_LIMIT_ANY
            details = {"unit": unit or ""}
        try:
            ok = await self.check_polkit(sender, action, details, interactive=interactive)
        except PolkitUnavailable as e:
            log.info("denied %s to uid %d: polkit unavailable (%s)", action, uid, e)
            raise NotAuthorized(
                f"polkit is not available, only root may change limits ({action})"
            ) from None
        if not ok:
            raise NotAuthorized(f"not authorized for {action}")
        return uid

    async def authorize_read(self, sender: str | None) -> int:
        """Reads are open (action ``read``, default yes); an admin may restrict them in polkit.

        Without polkit, reads are allowed.
        """
        uid = await self.caller_uid(sender)
        if uid == 0:
            return uid
        try:
            ok = await self.check_polkit(sender, names.POLKIT_ACTION_READ, {}, interactive=False)
        except PolkitUnavailable:
            return uid
        if not ok:
            raise NotAuthorized(f"not authorized for {names.POLKIT_ACTION_READ}")
        return uid

    def forget(self, sender: str) -> None:
        self._uids.pop(sender, None)

