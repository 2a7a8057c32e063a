"""Text from other people, made safe for a terminal or a log line.

Process names (any user can set theirs with ``prctl(PR_SET_NAME)``), command lines, cgroup
and unit names are data chosen by others.  Printed raw, ``\\x1b]2;pwn\\x07\\x1b[2J`` retitles
and clears the reader's terminal, and a newline forges a log line.  :func:`printable`
escapes every control character visibly — C0 (``\\x00``-``\\x1f``, newline and tab
included), DEL and C1 (``\\x7f``-``\\x9f``) as ``\\xHH``; the Unicode line and paragraph
separators and the bidirectional overrides and isolates as ``\\uHHHH`` — and leaves every
other character (accents, CJK, emoji) as it is.  Linear time; idempotent.

A leaf module: the CLI's renderers and the daemon's log formatter both use it.
"""

from __future__ import annotations

import re

#: C0, DEL, C1; U+2028/2029 (line/paragraph separators); U+202A-202E and U+2066-2069
#: (bidirectional embeddings, overrides and isolates, which reorder what follows them)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
#: the same without C0, which json.dumps escapes itself (and whose newlines indent it)
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` as a string with every control character escaped visibly."""
    s = text if isinstance(text, str) else str(text)
    return _UNSAFE.sub(_escape, s)


def printable_lines(text: str) -> str:
    """Like :func:`printable`, but keeps the newlines between lines (tracebacks)."""
    return "\n".join(printable(line) for line in text.split("\n"))


def json_safe(dumped: str) -> str:
    """A JSON text with the DEL, C1 and bidi characters that ``json.dumps(...,
    ensure_ascii=False)`` leaves raw written as ``\\uXXXX`` escapes (C0 is already
    escaped by json).  Such characters can only occur inside JSON strings, where a
    ``\\uXXXX`` escape stands for the same character: the data is unchanged."""
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", dumped)
