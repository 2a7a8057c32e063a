"""The one place where domain errors become D-Bus errors.

Every reply the interface sends for a failed call goes through :func:`to_dbus_error`.
A domain error (chadthrottle.errors.*) keeps its message and gets its contract name;
anything else is a bug: it is logged with its traceback and the caller only learns
``org.chadthrottle.Throttle1.Error.Failed`` with a generic text.
"""

from __future__ import annotations

import logging

from dbus_fast.errors import DBusError

from .. import errors, names

log = logging.getLogger("chadthrottle.service")

#: domain class -> contract error name.  Order does not matter: lookup walks the MRO.
ERROR_NAMES: dict[type[BaseException], str] = {
    errors.NoSuchProcess: names.ERR_NO_SUCH_PROCESS,
    errors.NoSuchLimit: names.ERR_NO_SUCH_LIMIT,
    errors.NoSuchUnit: names.ERR_NO_SUCH_UNIT,
    errors.InvalidLimit: names.ERR_INVALID_LIMIT,
    errors.NotAuthorized: names.ERR_NOT_AUTHORIZED,
    errors.Unsupported: names.ERR_UNSUPPORTED,
    # the authority could not answer: a failure of this call (retry), not a denial
    errors.AuthorizationFailed: names.ERR_FAILED,
    errors.LimitsExceeded: names.ERR_LIMITS_EXCEEDED,
    errors.InvalidRule: names.ERR_INVALID_RULE,
    errors.NoSuchRule: names.ERR_NO_SUCH_RULE,
}

FAILED_TEXT = "internal error; the traceback is in the daemon's journal"


def error_name(exc: BaseException) -> str | None:
    """The contract name of a domain error, or None if ``exc`` is not one."""
    for cls in type(exc).__mro__:
        name = ERROR_NAMES.get(cls)
        if name is not None:
            return name
    return None


def to_dbus_error(exc: BaseException, *, member: str = "?") -> DBusError:
    """Translate any exception raised while serving ``member`` into a DBusError.

    DBusErrors already built by the bus layer (InvalidArgs for a wrong signature)
    pass through unchanged.
    """
    if isinstance(exc, DBusError):
        return exc
    name = error_name(exc)
    if name is not None:
        text = str(exc) or type(exc).__name__
        return DBusError(name, text)
    log.error("unexpected error in %s", member, exc_info=(type(exc), exc, exc.__traceback__))
    return DBusError(names.ERR_FAILED, FAILED_TEXT)
