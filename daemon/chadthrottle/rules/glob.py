"""Executable path patterns of rules (the ``exe`` key): what they mean and how they match.

A pattern is an absolute path.  ``*`` and ``?`` are its only special characters:

* ``*`` matches any run of characters inside one path component (it never crosses ``/``);
* ``?`` matches exactly one character inside one path component;
* ``**`` as a whole component matches any number of directories: in the middle of a
  pattern zero or more (``/opt/**/bin/tool`` matches ``/opt/bin/tool`` and
  ``/opt/a/b/bin/tool``), as the last component one or more (``/usr/lib/steam/**`` is every
  file below ``/usr/lib/steam``, at any depth);
* every other character stands for itself (``[``, ``]`` and ``\\`` included: they are
  common in file names and are not classes or escapes here).

So ``/usr/lib/steam/*`` matches ``/usr/lib/steam/steam`` but not
``/usr/lib/steam/ubuntu12_32/steam``; write ``/usr/lib/steam/**`` for the whole tree.  A
leading dot is not special.  Patterns are compared with the path the kernel reports for a
process's executable (``/proc/PID/exe``: symbolic links resolved).

Refused (the caller reports the key): a relative path, an empty component (``//``), ``.``
or ``..`` components, a trailing ``/``, ``**`` mixed with other characters in a component,
control characters, more than PATH_MAX bytes.
"""

from __future__ import annotations

import functools
import re

PATH_MAX = 4096
GLOB_CHARS = frozenset("*?")
DOUBLE_STAR = "**"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class PatternError(ValueError):
    """The pattern is not a valid exe pattern; the message says why."""


def is_glob(pattern: str) -> bool:
    return any(c in GLOB_CHARS for c in pattern)


def components(pattern: str) -> list[str]:
    """'/a/b/c' -> ['a', 'b', 'c'] (the pattern is assumed valid)."""
    return pattern.split("/")[1:]


def check(pattern: str) -> None:
    """Raise PatternError when ``pattern`` is not a valid exe pattern."""
    if not pattern:
        raise PatternError("must not be empty")
    if _CONTROL.search(pattern):
        raise PatternError("must not contain control characters")
    if len(pattern.encode("utf-8", "surrogateescape")) > PATH_MAX:
        raise PatternError(f"is longer than {PATH_MAX} bytes")
    if not pattern.startswith("/"):
        raise PatternError(f"must be an absolute path (starting with '/'), not {pattern!r}")
    if pattern == "/" or pattern.endswith("/"):
        raise PatternError(f"must name a file, not a directory: {pattern!r}")
    for part in components(pattern):
        if part == "":
            raise PatternError(f"has an empty path component ('//'): {pattern!r}")
        if part in (".", ".."):
            raise PatternError(f"must not contain '.' or '..' components: {pattern!r}")
        if DOUBLE_STAR in part and part != DOUBLE_STAR:
            raise PatternError(
                f"'**' must be a whole path component (as in '/opt/**/bin/tool'), "
                f"not part of {part!r}")


def _component_regex(part: str) -> str:
    out = []
    for c in part:
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        else:
            out.append(re.escape(c))
    return "".join(out)


@functools.lru_cache(maxsize=1024)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """The regular expression a valid pattern stands for (matched against a whole path)."""
    check(pattern)
    parts = components(pattern)
    pieces = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == DOUBLE_STAR:
            pieces.append("(?:/[^/]+)+" if last else "(?:/[^/]+)*")
        else:
            pieces.append("/" + _component_regex(part))
    return re.compile("".join(pieces) + r"\Z", re.DOTALL)


def matches(pattern: str, path: str) -> bool:
    """True when the absolute ``path`` matches ``pattern`` (an exact path matches itself)."""
    if not is_glob(pattern):
        return path == pattern
    return compile_pattern(pattern).match(path) is not None


def literal_chars(pattern: str) -> int:
    """How many characters of the pattern are not wildcards (a more literal pattern is more
    specific: used to order rules)."""
    return sum(1 for c in pattern if c not in GLOB_CHARS)


def literal_dir(pattern: str) -> str:
    """The longest directory that every match lies below: '/usr/lib/steam/*' ->
    '/usr/lib/steam', '/opt/*/bin/x' -> '/opt', '/usr/bin/wget' -> '/usr/bin'."""
    parts = components(pattern)
    fixed: list[str] = []
    for part in parts[:-1]:
        if is_glob(part):
            break
        fixed.append(part)
    return "/" + "/".join(fixed)
