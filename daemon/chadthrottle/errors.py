"""Domain errors raised by the engine.  They know nothing about D-Bus; the bus layer
maps each class to its contract error name in exactly one place
(chadthrottle.service.errors)."""


class ChadthrottleError(Exception):
    """Base of every error the engine raises on purpose."""


class NoSuchProcess(ChadthrottleError):
    """pid 0, a kernel thread, or a pid that does not exist (any more)."""


class NoSuchLimit(ChadthrottleError):
    """Clearing a limit that is not set."""


class NoSuchUnit(ChadthrottleError):
    """A unit name or cgroup path that is not an existing cgroup below the cgroup2 mount."""


class InvalidLimit(ChadthrottleError):
    """A rate outside 0 or RATE_MIN..RATE_MAX, or a target that must not be limited."""


class NotAuthorized(ChadthrottleError):
    """The caller may not do this (raised by the authorization layer)."""


class Unsupported(ChadthrottleError):
    """The kernel or the cgroup setup cannot serve; the message says what is missing."""


class InvalidRule(ChadthrottleError):
    """A rule that cannot be accepted: unknown key, wrong type, bad glob or regex, no match
    key, a bad rate.  The message names the key (and the file, for a rule file); ``key`` and
    ``source`` carry them for structured logs."""

    def __init__(self, message: str, *, key: str | None = None,
                 source: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.source = source


class MetricsUnavailable(ChadthrottleError):
    """A scrape could not get the daemon's figures in time (its event loop is busy or
    stopping): the endpoint answers 503."""


class NoSuchRule(ChadthrottleError):
    """Removing (or naming) a rule id that does not exist."""


class InvalidConfig(ChadthrottleError):
    """The daemon's settings file (``chadthrottled.toml``) or a setting given on the command
    line cannot be accepted: unknown key, wrong type, bad value, not TOML.  The message names
    the key and the file (or the option); ``key`` and ``source`` carry them."""

    def __init__(self, message: str, *, key: str | None = None,
                 source: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.source = source

class AuthorizationFailed(ChadthrottleError):
    """The authority could not answer (polkit did not reply, the bus refused the call for
    lack of resources, too many calls in flight): nothing was changed and the call may be
    retried.  Never a denial — NotAuthorized means "asked, and the answer was no"."""


class LimitsExceeded(ChadthrottleError):
    """A per-caller quota is used up (e.g. Stats subscriptions of one user)."""
