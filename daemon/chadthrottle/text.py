"""Text that comes from processes (names, command lines, unit names) made safe to print.

A process chooses its own name: ``\\x1b]2;pwn\\x07\\x1b[2J`` is a valid one.  Every human
output (the terminal, the journal's MESSAGE) shows control characters escaped instead.
"""

from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}"


def safe(text: object) -> str:
    """str(text) with C0, DEL and C1 control characters (and backslashes) escaped."""
    s = str(text)
    if not _CONTROL.search(s) and "\\" not in s:
        return s
    return _CONTROL.sub(_escape, s.replace("\\", "\\\\"))
