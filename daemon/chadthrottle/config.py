"""The daemon's settings: ``<config dir>/chadthrottled.toml``.

::

    log_level = "info"            # as --log-level: debug, info, warning, error
    monitor_all = false           # as --monitor-all
    max_limits = 16384            # as --max-limits: room for that many limits in the kernel
    [metrics]
    listen = "127.0.0.1:9917"     # or "[::1]:9917", or "unix:/run/chadthrottle/metrics.sock";
                                  # absent or "" = no metrics endpoint

Validation is strict, as for rules (:mod:`chadthrottle.rules.model`): an unknown key, a
string where a boolean belongs (``monitor_all = "yes"``), a listen address that is not an IP
address and a port — each is an :class:`~chadthrottle.errors.InvalidConfig` whose message
names the file and the key (``metrics.listen`` for a key of a table).  A missing file is
fine (every default applies); a broken one makes the daemon refuse to start.

Where a setting comes from, first found wins (:func:`effective`):

1. the command line (``--log-level``, ``--monitor-all`` / ``--no-monitor-all``,
   ``--metrics-listen``);
2. this file;
3. the environment (``CHADTHROTTLE_LOG``, ``CHADTHROTTLE_MONITOR_ALL=1``): the packaged
   unit sets ``CHADTHROTTLE_LOG=info`` as a baseline, which the administrator's file must be
   able to override.  ``CHADTHROTTLE_LOG``'s per-logger part
   (``info,chadthrottle.engine=debug``) still applies under a level from the file;
4. the built-in defaults (info, no monitor-all, no metrics).

Settings are read at start only; ``systemctl reload`` (SIGHUP) re-reads the rules, and says
in the journal when this file changed (the new settings need a restart).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import errortext
from .errors import InvalidConfig

#: room for limits (budgets: each SetLimit, each process a scope=process rule limits, each
#: application rule) in the kernel's maps; ~0.2 KB of kernel memory each
MAX_LIMITS_DEFAULT = 16384
MAX_LIMITS_MIN, MAX_LIMITS_MAX = 16, 1 << 20

LOG_LEVELS = ("debug", "info", "warning", "error")
ENV_LOG = "CHADTHROTTLE_LOG"
ENV_MONITOR_ALL = "CHADTHROTTLE_MONITOR_ALL"
UNIX_PREFIX = "unix:"
#: sockaddr_un.sun_path holds 108 bytes, the terminating NUL included
UNIX_PATH_MAX = 107
#: the address the README suggests (not a default: metrics are off unless configured)
SUGGESTED_LISTEN = "127.0.0.1:9917"


# --- the listen address -----------------------------------------------------------------------
@dataclass(frozen=True)
class ListenAddress:
    """Where the metrics endpoint listens: an IP address and a TCP port, or a unix socket."""

    host: str = ""  # an IPv4 or IPv6 address (no brackets); "" for a unix socket
    port: int = 0
    path: str = ""  # the unix socket's absolute path

    @property
    def is_unix(self) -> bool:
        return bool(self.path)

    @property
    def is_loopback(self) -> bool:
        return self.is_unix or ipaddress.ip_address(self.host).is_loopback

    def __str__(self) -> str:
        if self.is_unix:
            return UNIX_PREFIX + self.path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>[^:]*)\Z")


def parse_listen(text: str) -> ListenAddress | None:
    """``"127.0.0.1:9917"``, ``"[::1]:9917"``, ``"unix:/run/chadthrottle/metrics.sock"`` ->
    a ListenAddress; ``""`` -> None (no endpoint).  Raises ValueError saying what to write."""
    if text == "":
        return None
    if "\0" in text or any(c.isspace() for c in text):
        raise ValueError(f"must not contain spaces or NUL ({text!r})")
    if text.startswith(UNIX_PREFIX):
        path = text[len(UNIX_PREFIX):]
        if not path.startswith("/"):
            raise ValueError(f"a unix socket needs an absolute path: unix:/run/chadthrottle/"
                             f"metrics.sock, not {text!r}")
        if path.endswith("/"):
            raise ValueError(f"a unix socket path names a file, not a directory ({text!r})")
        if len(path.encode()) > UNIX_PATH_MAX:
            raise ValueError(f"a unix socket path is at most {UNIX_PATH_MAX} bytes long; "
                             f"this one is {len(path.encode())}")
        return ListenAddress(path=path)
    m = _HOST_PORT.match(text)
    if not m and text.count(":") > 1 and "[" not in text:
        raise ValueError(f"an IPv6 address is written in brackets: [::1]:9917, not {text!r}")
    if not m:
        raise ValueError(f"must be an IP address and a port ({SUGGESTED_LISTEN}, [::1]:9917) "
                         f"or unix:/path, not {text!r}")
    port_text = m.group("port")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"the port must be a number from 1 to 65535, not {port_text!r}")
    if m.group("v6") is not None:
        try:
            host = str(ipaddress.IPv6Address(m.group("v6")))
        except ValueError:
            raise ValueError(f"{m.group('v6')!r} in brackets is not an IPv6 address") from None
    else:
        try:
            host = str(ipaddress.IPv4Address(m.group("host")))
        except ValueError:
            raise ValueError(f"{m.group('host')!r} is not an IPv4 address: write an IP "
                             f"address such as 127.0.0.1 (host names are not looked up)"
                             ) from None
    return ListenAddress(host=host, port=int(port_text))


# --- the model --------------------------------------------------------------------------------
class MetricsSettings(BaseModel):
    """The ``[metrics]`` table."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    listen: str = ""

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        parse_listen(v)
        return v

    @property
    def address(self) -> ListenAddress | None:
        return parse_listen(self.listen)


class Settings(BaseModel):
    """The whole file.  Build one with :func:`load` or :func:`from_toml` to get errors that
    name the file and the key."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    log_level: Literal["debug", "info", "warning", "error"] | None = None
    monitor_all: bool = False
    max_limits: int = Field(default=MAX_LIMITS_DEFAULT, ge=MAX_LIMITS_MIN, le=MAX_LIMITS_MAX)
    metrics: MetricsSettings = MetricsSettings()


KEYS: dict[str, tuple[str, ...]] = {
    "": tuple(Settings.model_fields),
    "metrics": tuple(MetricsSettings.model_fields),
}


_TYPE_TEXT = {
    "bool_type": "must be true or false (a boolean)",
    "string_type": "must be a string",
    "model_type": "must be a table ([metrics])",
    "literal_error": "must be one of " + ", ".join(repr(x) for x in LOG_LEVELS),
}


def _error_text(err: Mapping[str, Any]) -> tuple[str, str]:
    """(dotted key, sentence naming it) for one pydantic error."""
    loc = [str(x) for x in err.get("loc") or ()]
    key = ".".join(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        table = ".".join(loc[:-1])
        known = ", ".join(".".join(x for x in (table, k) if x) for k in KEYS.get(table, ()))
        return key, f"unknown key {key!r} (the keys are: {known})"
    return key, f"key {key!r}: {errortext.sentence(err, _TYPE_TEXT)}"


def validate(data: Mapping[str, Any], source: str) -> Settings:
    """Settings from parsed TOML; InvalidConfig naming ``source`` and the key."""
    try:
        return Settings.model_validate(dict(data))
    except ValidationError as e:
        found = [_error_text(err) for err in e.errors()]
        raise InvalidConfig(f"{source}: " + "; ".join(t for _, t in found), key=found[0][0],
                            source=source) from None


_AT_LINE = re.compile(r"\(at line (\d+), column \d+\)")
_KEY_LINE = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*=")


def from_toml(text: str, source: str) -> Settings:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        key = None
        m = _AT_LINE.search(str(e))
        lines = text.splitlines()
        if m and 0 < int(m.group(1)) <= len(lines):
            k = _KEY_LINE.match(lines[int(m.group(1)) - 1])
            key = k.group(1) if k else None
        where = f"key {key!r}: " if key else ""
        raise InvalidConfig(f"{source}: {where}not valid TOML: {e}", key=key,
                            source=source) from None
    return validate(data, source)


def load(path: Path) -> Settings:
    """The settings in ``path``; the defaults when it does not exist."""
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Settings()
    except OSError as e:
        raise InvalidConfig(f"{source}: cannot be read: {e.strerror or e}",
                            source=source) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidConfig(f"{source}: is not UTF-8 text (byte {e.start})",
                            source=source) from None
    return from_toml(text, source)


# --- command line > file > environment > defaults ----------------------------------------------
@dataclass(frozen=True)
class Effective:
    """The settings in force, and where each came from ("option", "file", "environment",
    "default")."""

    log_level: str | None  # None: CHADTHROTTLE_LOG or the built-in default decides
    monitor_all: bool
    metrics: ListenAddress | None
    sources: dict[str, str]
    max_limits: int = MAX_LIMITS_DEFAULT

    def describe(self) -> str:
        """One line for the journal."""
        level = self.log_level or "(from $CHADTHROTTLE_LOG or default)"
        return (f"log_level={level} [{self.sources['log_level']}], "
                f"monitor_all={str(self.monitor_all).lower()} [{self.sources['monitor_all']}], "
                f"metrics.listen={self.metrics or 'off'} [{self.sources['metrics.listen']}], "
                f"max_limits={self.max_limits} [{self.sources.get('max_limits', 'default')}]")


def effective(file: Settings, environ: Mapping[str, str], *, log_level: str | None = None,
              monitor_all: bool | None = None, metrics_listen: str | None = None,
              max_limits: int | None = None) -> Effective:
    """Merge the command line (None: not given), the file and the environment."""
    set_in_file = file.model_fields_set
    sources: dict[str, str] = {}
    if log_level:
        level, sources["log_level"] = log_level, "option"
    elif "log_level" in set_in_file and file.log_level:
        level, sources["log_level"] = file.log_level, "file"
    else:
        level = None
        sources["log_level"] = "environment" if environ.get(ENV_LOG) else "default"
    if monitor_all is not None:
        mon, sources["monitor_all"] = monitor_all, "option"
    elif "monitor_all" in set_in_file:
        mon, sources["monitor_all"] = file.monitor_all, "file"
    elif environ.get(ENV_MONITOR_ALL) in ("0", "1"):
        mon, sources["monitor_all"] = environ[ENV_MONITOR_ALL] == "1", "environment"
    else:
        mon, sources["monitor_all"] = False, "default"
    if metrics_listen is not None:
        try:
            addr = parse_listen(metrics_listen)
        except ValueError as e:
            raise InvalidConfig(f"--metrics-listen: {e}", key="metrics.listen",
                                source="--metrics-listen") from None
        sources["metrics.listen"] = "option"
    elif "listen" in file.metrics.model_fields_set:
        addr, sources["metrics.listen"] = file.metrics.address, "file"
    else:
        addr, sources["metrics.listen"] = None, "default"
    if max_limits is not None:
        if not MAX_LIMITS_MIN <= max_limits <= MAX_LIMITS_MAX:
            raise InvalidConfig(f"--max-limits: {max_limits} is not between {MAX_LIMITS_MIN} "
                                f"and {MAX_LIMITS_MAX}", key="max_limits", source="--max-limits")
        most, sources["max_limits"] = max_limits, "option"
    elif "max_limits" in set_in_file:
        most, sources["max_limits"] = file.max_limits, "file"
    else:
        most, sources["max_limits"] = MAX_LIMITS_DEFAULT, "default"
    return Effective(level, mon, addr, sources, most)
