"""Logging for the daemon: the systemd journal with structured fields, or stderr.

A record may carry journal fields in ``extra={"journal": {"CHADTHROTTLE_PID": 12, ...}}``;
they become native journal fields (``journalctl CHADTHROTTLE_PID=12``).  Without a journal
socket (or without systemd-python) the same lines go to stderr.

Verbosity: ``--log-level LEVEL`` or ``CHADTHROTTLE_LOG``, which takes a RUST_LOG-like list:
``debug`` or ``info,chadthrottle.engine=debug`` (logger=level pairs override the default).

Messages carry names chosen by others (process names, cgroup and unit names): every line,
journal MESSAGE and stderr alike, is formatted by :class:`SafeFormatter`, which escapes
control characters (``\\x1b``), so no process can forge a line or drive the terminal of
someone reading the log.  Structured fields keep the raw values.
"""

from __future__ import annotations

import logging
import os
import sys

from ..safetext import printable, printable_lines

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "chadthrottled"
ENV_VAR = "CHADTHROTTLE_LOG"

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def journal_priority(levelno: int) -> int:
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class SafeFormatter(logging.Formatter):
    """A Formatter whose output has every control character of the message escaped
    (tracebacks keep their line breaks, each line escaped)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # noqa: N802
        return printable_lines(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return printable_lines(super().formatStack(stack_info))


class JournalHandler(logging.Handler):
    """Sends each record to journald with its ``journal`` fields (MESSAGE escaped, fields
    raw)."""

    def __init__(self, send=None) -> None:
        super().__init__()
        self.setFormatter(SafeFormatter("%(message)s"))
        if send is None:
            from systemd import journal

            send = journal.send
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {
                "PRIORITY": str(journal_priority(record.levelno)),
                "SYSLOG_IDENTIFIER": IDENTIFIER,
                "LOGGER": record.name,
                "CODE_FILE": record.pathname,
                "CODE_LINE": record.lineno,
                "CODE_FUNC": record.funcName,
            }
            fields.update(getattr(record, "journal", None) or {})
            self._send(self.format(record), **fields)
        except Exception:  # pragma: no cover - never let logging kill the daemon
            self.handleError(record)


def journal_available() -> bool:
    if not os.path.exists(JOURNAL_SOCKET):
        return False
    try:
        import systemd.journal  # noqa: F401
    except ImportError:
        return False
    return True


def parse_spec(spec: str | None, default: str = "info") -> tuple[int, dict[str, int]]:
    """``"info,chadthrottle.engine=debug"`` -> (INFO, {"chadthrottle.engine": DEBUG})."""
    level = _level(default)
    per_logger: dict[str, int] = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            name, _, lvl = part.partition("=")
            per_logger[name.strip()] = _level(lvl)
        else:
            level = _level(part)
    return level, per_logger


def _level(name: str) -> int:
    name = name.strip().upper()
    aliases = {"TRACE": "DEBUG", "WARN": "WARNING", "OFF": "CRITICAL"}
    value = logging.getLevelName(aliases.get(name, name))
    if not isinstance(value, int):
        raise ValueError(f"unknown log level: {name.lower()}")
    return value


def setup(level: str | None = None, target: str = "auto") -> str:
    """Configure the root logger; returns the target used ("journal" or "stderr")."""
    default_level, per_logger = parse_spec(os.environ.get(ENV_VAR))
    if level:
        default_level = _level(level)
    if target == "auto":
        target = "journal" if journal_available() else "stderr"
    if target == "journal":
        handler: logging.Handler = JournalHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            SafeFormatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(default_level)
    for name, lvl in per_logger.items():
        logging.getLogger(name).setLevel(lvl)
    return target
