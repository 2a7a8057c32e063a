"""Authorization of bus callers: uid from the bus, polkit for everyone but root.

Rules (DESIGN §2):
* the caller's uid comes from the bus daemon (GetConnectionUnixUser), never from an argument;
* uid 0 may do everything;
* any other caller needs polkit's consent to change a limit: ``limit-own`` for a process
  running under the caller's own uid, ``limit-any`` for anything else (another user's
  process, a process whose owner cannot be read, a whole unit/cgroup);
* reads (GetStats, ListLimits, ListProcesses, properties) are open: they are served without
  asking anyone, so no read can be slowed down or refused by polkit;
* without a reachable polkit, only uid 0 may change limits;
* anything that is not explicitly allowed is denied.

"No" and "could not ask" are different answers (issue 7, item 6).  NotAuthorized means polkit
answered no, or polkit is absent and the caller is not root.  When polkit or the bus cannot
answer — the bus refuses our call for lack of resources (LimitsExceeded), no reply, a
timeout — the call fails with :class:`~chadthrottle.errors.AuthorizationFailed` (the
contract's ``Failed``), after a few quick retries where retrying can help.  A flood of calls
cannot produce that either: every outgoing call of the gate (to polkit and to the bus
driver) holds one of :data:`MAX_OUTGOING` slots, well below dbus-daemon's default quota of
128 pending replies per connection, and one caller uid holds at most :data:`PER_USER` polkit
checks at a time, so one user's flood waits in its own queue instead of starving others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dbus_fast import Message, MessageType, Variant

from .. import names
from ..cgroups import check_unit_name
from ..errors import AuthorizationFailed, NotAuthorized
from ..ratelimit import RateLimiter, log_limited

log = logging.getLogger("chadthrottle.polkit")

POLKIT_NAME = names.POLKIT_NAME
POLKIT_PATH = names.POLKIT_PATH
POLKIT_INTERFACE = names.POLKIT_INTERFACE
BUS_DRIVER = names.BUS_DRIVER
CHECK_ALLOW_USER_INTERACTION = 0x1

_ERR = "org.freedesktop.DBus.Error."
#: polkit cannot be asked at all: not running, not installed, or the bus does not let us
#: reach it.  Then only root may change limits.
_ABSENT = {_ERR + "ServiceUnknown", _ERR + "NameHasNoOwner", _ERR + "AccessDenied"}
_ABSENT_PREFIX = _ERR + "Spawn."  # activation failed: not installed / not startable
#: the bus refused the call for lack of resources right now: retry shortly
_RETRY = {_ERR + "LimitsExceeded", _ERR + "NoMemory"}
#: polkit answered, and the answer is no (the user dismissed the authentication dialog)
_DENIED = {"org.freedesktop.PolicyKit1.Error.Cancelled"}
# anything else (NoReply, TimedOut, Disconnected, polkit's own Failed, ...) is a failure to
# answer: AuthorizationFailed

NONINTERACTIVE_TIMEOUT = 10.0
INTERACTIVE_TIMEOUT = 120.0
#: outgoing calls of the gate in flight at once (polkit and bus driver), non-interactive;
#: dbus-daemon's default max_replies_per_connection is 128
MAX_OUTGOING = 32
#: interactive polkit checks (waiting for a password) in flight at once, on top of those
MAX_INTERACTIVE = 16
#: polkit checks of one caller uid in flight at once (interactive: one dialog at a time)
PER_USER = 4
PER_USER_INTERACTIVE = 1
#: authorizations queued or in flight for one connection; beyond: refused at once
MAX_QUEUED_PER_SENDER = 128
#: how long a call may wait for a slot before it fails (clients time out after 25 s)
QUEUE_TIMEOUT = 20.0
#: quick retries of a call the bus refused for lack of resources
RETRY_DELAYS = (0.05, 0.2, 0.5)


class PolkitUnavailable(Exception):
    """polkit cannot be asked (not running, not installed, unreachable by policy)."""


@dataclass(frozen=True)
class Answer:
    """polkit's CheckAuthorization result."""

    authorized: bool
    challenge: bool


def action_for(caller_uid: int, target_uid: int | None,
               limit: tuple[str, int] | None = None) -> str:
    """The polkit action a non-root caller needs to change a limit on a target.

    ``limit`` is (origin, uid of who set it) of a limit the target has now.  A user may
    change limits of their own processes (limit-own) — but not a limit someone else set
    (root, an admin) or a rule made: changing or clearing those needs limit-any, whoever
    owns the process (issue 7, item 3)."""
    if target_uid is None or target_uid != caller_uid:
        return names.POLKIT_ACTION_LIMIT_ANY
    if limit is not None:
        origin, owner_uid = limit
        if origin != "explicit" or owner_uid != caller_uid:
            return names.POLKIT_ACTION_LIMIT_ANY
    return names.POLKIT_ACTION_LIMIT_OWN


def _error_text(reply: Message) -> str:
    text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
    return f"{reply.error_name}: {text}" if text else str(reply.error_name)


class _KeyedSemaphores:
    """One semaphore of ``value`` per key, created on demand, dropped when unused."""

    def __init__(self, value: int) -> None:
        self._value = value
        self._sems: dict[object, list] = {}  # key -> [semaphore, users]

    @contextlib.asynccontextmanager
    async def hold(self, key: object, timeout: float) -> AsyncIterator[None]:
        entry = self._sems.setdefault(key, [asyncio.Semaphore(self._value), 0])
        entry[1] += 1
        try:
            async with _acquired(entry[0], timeout):
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._sems[key]


@contextlib.asynccontextmanager
async def _acquired(sem: asyncio.Semaphore, timeout: float) -> AsyncIterator[None]:
    try:
        await asyncio.wait_for(sem.acquire(), timeout)
    except TimeoutError:
        raise AuthorizationFailed(
            "the daemon is busy answering other authorization requests; try again") from None
    try:
        yield
    finally:
        sem.release()


class Authorizer:
    """Answers "may this bus caller do this?" — raises NotAuthorized when not, and
    AuthorizationFailed when the question could not be answered."""

    def __init__(self, bus, *, uid_cache_size: int = 4096, max_outgoing: int = MAX_OUTGOING,
                 max_interactive: int = MAX_INTERACTIVE, per_user: int = PER_USER,
                 max_queued_per_sender: int = MAX_QUEUED_PER_SENDER) -> None:
        self._bus = bus
        # unique bus names are never reused during the bus's lifetime: caching is safe
        self._uids: OrderedDict[str, int] = OrderedDict()
        self._uid_cache_size = uid_cache_size
        self._uid_lookups: dict[str, asyncio.Future] = {}  # one lookup per sender at a time
        self._outgoing = asyncio.Semaphore(max_outgoing)
        self._interactive = asyncio.Semaphore(max_interactive)
        self._per_user = _KeyedSemaphores(per_user)
        self._per_user_interactive = _KeyedSemaphores(PER_USER_INTERACTIVE)
        self._queued: dict[str, int] = {}
        self._max_queued = max_queued_per_sender
        self._log_limit = RateLimiter(burst=5, period=10.0)

    # ----------------------------------------------------------------- outgoing calls
    async def _call(self, msg: Message, *, interactive: bool = False) -> Message:
        """One outgoing call under the global bound; retried while the bus refuses it for
        lack of resources.  Returns the reply (a METHOD_RETURN or an ERROR message)."""
        slots = self._interactive if interactive else self._outgoing
        timeout = INTERACTIVE_TIMEOUT if interactive else NONINTERACTIVE_TIMEOUT
        for attempt in range(len(RETRY_DELAYS) + 1):
            async with _acquired(slots, QUEUE_TIMEOUT):
                try:
                    reply = await asyncio.wait_for(self._bus.call(msg), timeout)
                except TimeoutError:
                    log_limited(log, self._log_limit, ("timeout", msg.destination),
                                logging.WARNING, "no answer from %s to %s within %.0f s",
                                msg.destination, msg.member, timeout)
                    raise AuthorizationFailed(
                        f"no answer from {msg.destination} within {timeout:.0f} s; nothing "
                        f"was changed, try again") from None
            if reply.message_type is not MessageType.ERROR or reply.error_name not in _RETRY:
                return reply
            if attempt < len(RETRY_DELAYS):
                await asyncio.sleep(RETRY_DELAYS[attempt])
        return reply

    def _failed(self, what: str, reply: Message) -> AuthorizationFailed:
        log_limited(log, self._log_limit, ("failed", what, reply.error_name), logging.WARNING,
                    "could not %s: %s", what, _error_text(reply))
        return AuthorizationFailed(f"could not {what} ({reply.error_name}); nothing was "
                                   f"changed, try again")

    # ----------------------------------------------------------------- who is calling
    async def caller_uid(self, sender: str | None) -> int:
        if not sender:
            raise NotAuthorized("the message has no sender")
        uid = self._uids.get(sender)
        if uid is not None:
            return uid
        pending = self._uid_lookups.get(sender)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup_uid(sender))
            self._uid_lookups[sender] = pending
            pending.add_done_callback(lambda f: self._lookup_done(sender, f))
        return await asyncio.shield(pending)

    def _lookup_done(self, sender: str, fut: asyncio.Future) -> None:
        self._uid_lookups.pop(sender, None)
        if not fut.cancelled():
            fut.exception()  # retrieved here too: every waiter may have gone away

    async def _lookup_uid(self, sender: str) -> int:
        reply = await self._call(Message(
            destination=BUS_DRIVER, path=names.BUS_DRIVER_PATH, interface=BUS_DRIVER,
            member="GetConnectionUnixUser", signature="s", body=[sender]))
        if reply.message_type is MessageType.ERROR:
            if reply.error_name == _ERR + "NameHasNoOwner":
                raise NotAuthorized(f"the caller {sender} has left the bus")
            raise self._failed(f"identify the caller {sender}", reply)
        uid = int(reply.body[0])
        self._uids[sender] = uid
        if len(self._uids) > self._uid_cache_size:
            self._uids.popitem(last=False)
        return uid

    # ----------------------------------------------------------------- polkit
    async def check(self, sender: str, uid: int, action: str, details: dict[str, str], *,
                    interactive: bool) -> Answer:
        """polkit's CheckAuthorization for the bus name ``sender`` (running as ``uid``).

        Raises PolkitUnavailable when polkit cannot be asked, AuthorizationFailed when it
        did not answer."""
        subject = ["system-bus-name", {"name": Variant("s", sender)}]
        msg = Message(
            destination=POLKIT_NAME, path=POLKIT_PATH, interface=POLKIT_INTERFACE,
            member="CheckAuthorization", signature="(sa{sv})sa{ss}us",
            body=[subject, action, details,
                  CHECK_ALLOW_USER_INTERACTION if interactive else 0, ""],
        )
        per_user = self._per_user_interactive if interactive else self._per_user
        async with per_user.hold(uid, INTERACTIVE_TIMEOUT if interactive else QUEUE_TIMEOUT):
            reply = await self._call(msg, interactive=interactive)
        if reply.message_type is MessageType.ERROR:
            name = reply.error_name or ""
            if name in _ABSENT or name.startswith(_ABSENT_PREFIX):
                raise PolkitUnavailable(_error_text(reply))
            if name in _DENIED:
                return Answer(False, False)
            raise self._failed(f"ask polkit about {action}", reply)
        is_authorized, is_challenge, _details = reply.body[0]
        log.debug("polkit %s for %s: authorized=%s challenge=%s", action, sender,
                  is_authorized, is_challenge)
        return Answer(bool(is_authorized), bool(is_challenge))

    async def check_polkit(self, sender: str, action: str, details: dict[str, str], *,
                           interactive: bool) -> bool:
        """True/False from polkit; PolkitUnavailable / AuthorizationFailed as :meth:`check`."""
        uid = await self.caller_uid(sender)
        return (await self.check(sender, uid, action, details, interactive=interactive)).authorized

    # ----------------------------------------------------------------- decisions
    @contextlib.contextmanager
    def _queued_for(self, sender: str):
        n = self._queued.get(sender, 0)
        if n >= self._max_queued:
            log_limited(log, self._log_limit, ("queue", sender), logging.WARNING,
                        "%s has %d calls waiting for authorization: refusing more", sender, n)
            raise AuthorizationFailed("too many calls waiting for authorization on this "
                                      "connection; try again")
        self._queued[sender] = n + 1
        try:
            yield
        finally:
            left = self._queued[sender] - 1
            if left:
                self._queued[sender] = left
            else:
                del self._queued[sender]

    async def authorize_change(
        self, sender: str | None, *, pid: int | None = None, unit: str | None = None,
        rules: bool = False, target_uid: int | None = None,
        limit: tuple[str, int] | None = None, interactive: bool = False,
    ) -> int:
        """Authorize a mutating call; returns the caller's uid or raises NotAuthorized
        (or AuthorizationFailed when the authority could not answer).

        pid: a process limit, with the owner of the process (``target_uid``, read by the
        caller through a pidfd opened before this call) and the limit it has now (``limit``:
        origin and setter); unit: a unit limit; rules: AddRule, RemoveRule, Reload."""
        if not sender:
            raise NotAuthorized("the message has no sender")
        with self._queued_for(sender):
            uid = await self.caller_uid(sender)
            if uid == 0:
                return uid
            if rules:
                action = names.POLKIT_ACTION_MANAGE_RULES
                details: dict[str, str] = {}
            elif pid is not None:
                action = action_for(uid, target_uid, limit)
                details = {"pid": str(pid)}
                if target_uid is not None:
                    details["target_uid"] = str(target_uid)
            else:
                # a name no cgroup can have (too long: issue 7, item 9) is NoSuchUnit at once
                # and never forwarded to polkit as a detail
                action = names.POLKIT_ACTION_LIMIT_ANY
                details = {"unit": check_unit_name(unit)}
            try:
                answer = await self.check(sender, uid, action, details, interactive=interactive)
            except PolkitUnavailable as e:
                log_limited(log, self._log_limit, ("absent", action), logging.INFO,
                            "denied %s to uid %d: polkit unavailable (%s)", action, uid, e)
                raise NotAuthorized(
                    f"polkit is not available, only root may change limits ({action})"
                ) from None
            if not answer.authorized:
                log_limited(log, self._log_limit, ("denied", action, uid), logging.INFO,
                            "denied %s to uid %d (%s)", action, uid,
                            ", ".join(f"{k}={v}" for k, v in details.items()))
                raise NotAuthorized(f"not authorized for {action}")
            return uid

    async def permissions(self, sender: str | None) -> dict[str, str]:
        """GetPermissions: for the calling user, each polkit action -> yes, auth or no.

        Asked without interaction: authorized -> yes, a challenge (a password would do)
        -> auth, else no.  Root: all yes.  ``read`` is always yes (reads are open and never
        ask polkit).  Without polkit: all no for users (only root may change limits), read
        yes.  When polkit does not answer: AuthorizationFailed (Failed), as for a change."""
        if not sender:
            raise NotAuthorized("the message has no sender")
        with self._queued_for(sender):
            uid = await self.caller_uid(sender)
            if uid == 0:
                return dict.fromkeys(names.POLKIT_ACTIONS, names.PERMISSION_YES)
            out: dict[str, str] = {}
            polkit_absent = False
            for action in names.POLKIT_ACTIONS:
                if action == names.POLKIT_ACTION_READ:
                    out[action] = names.PERMISSION_YES
                    continue
                if polkit_absent:
                    out[action] = names.PERMISSION_NO
                    continue
                try:
                    answer = await self.check(sender, uid, action, {}, interactive=False)
                except PolkitUnavailable:
                    polkit_absent = True
                    out[action] = names.PERMISSION_NO
                    continue
                out[action] = (names.PERMISSION_YES if answer.authorized else
                               names.PERMISSION_AUTH if answer.challenge else
                               names.PERMISSION_NO)
            return out

    def forget(self, sender: str) -> None:
        """``sender`` left the bus."""
        self._uids.pop(sender, None)
