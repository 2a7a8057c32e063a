"""Logging for the daemon: the systemd journal with structured fields, or stderr.

A record may carry journal fields in ``extra={"journal": {"CHADTHROTTLE_PID": 12, ...}}``;
they become native journal fields (``journalctl CHADTHROTTLE_PID=12``).  Without a journal
socket (or without systemd-python) the same lines go to stderr.

Verbosity: ``--log-level LEVEL`` or ``CHADTHROTTLE_LOG``, which takes a RUST_LOG-like list:
``debug`` or ``info,chadthrottle.engine=debug`` (logger=level pairs override the default).
"""

from __future__ import annotations

import logging
import os
import sys

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


class JournalHandler(logging.Handler):
    """Sends each record to journald with its ``journal`` fields."""

    def __init__(self, send=None) -> None:
        super().__init__()
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
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)-5s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(default_level)
    for name, lvl in per_logger.items():
        logging.getLogger(name).setLevel(lvl)
    return target
