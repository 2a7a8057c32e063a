"""Human-readable bandwidth rates: parsing what people type, formatting what they read.

One rule, stated once (and printed by ``chadthrottlectl --help`` from :data:`RULES`):

* A bare number is **bytes per second**: ``51200`` = 51,200 B/s.
* ``K`` ``M`` ``G`` ``T`` (any case, optionally followed by ``B``) are **decimal bytes**:
  ``50K`` = ``50KB`` = 50,000 B/s, ``1.5M`` = 1,500,000 B/s, ``2MB/s`` = 2,000,000 B/s.
* ``KiB`` ``MiB`` ``GiB`` ``TiB`` are **binary bytes**: ``512KiB/s`` = 524,288 B/s.
* ``kbit`` ``mbit`` ``gbit`` ``tbit`` (any case) are **decimal bits** (as in ``tc``):
  ``10mbit`` = 10,000,000 bit/s = 1,250,000 B/s; ``Kibit`` … are binary bits.
* ``0``, ``unlimited``, ``none`` and ``off`` mean "no limit" (0).
* An optional ``/s`` may follow any unit.  Inputs whose meaning is disputed are refused with
  a message saying what to write instead, never guessed: a lowercase ``b`` (``10Mb``: bits or
  bytes?) and the ``…ps`` forms (``10Mbps`` is megabits to network vendors but megabytes to
  ``tc``).

Fractions are allowed (``1.5M``); the result is rounded to the nearest whole byte per second.

Display: measured rates use decimal units with one decimal (``48.2 KB/s``, as in the daemon's
journal lines); limits are shown exactly, in whichever of the units above is shortest
(``50 KB/s``, ``50 KiB/s``, ``1.5 MB/s``), so that what is shown can be typed back in.

Pure functions only; no I/O.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from chadthrottle.names import RATE_MAX, RATE_MIN

__all__ = [
    "RULES",
    "RateError",
    "check_rate",
    "format_bytes",
    "format_limit",
    "format_rate",
    "parse_rate",
]

RULES = """\
rates: a bare number is bytes/s; K M G T (= KB MB GB TB) are decimal bytes
(50K = 50,000 B/s); KiB MiB GiB TiB are binary bytes (512KiB = 524,288 B/s);
kbit mbit gbit tbit are decimal bits (10mbit = 1,250,000 B/s); an optional /s
may follow. 0, 'unlimited', 'none' or 'off' = no limit. A lowercase 'b' (10Mb)
and the '...ps' forms (10Mbps) are ambiguous and refused. A limit is 0 or
1024 B/s (1KiB) ... 2^40 B/s (1TiB)."""

_UNLIMITED_WORDS = frozenset({"0", "unlimited", "none", "off"})

_PREFIXES = {"k": 1, "m": 2, "g": 3, "t": 4}
_PREFIX_NAMES = "KMGT"

_NUMBER_RE = re.compile(r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[A-Za-z/]*)\s*$")
# prefix letter, optional 'i' (binary), then the quantity: B, b (ambiguous), bit(s), or nothing
_UNIT_RE = re.compile(r"^(?P<prefix>[kKmMgGtT])?(?P<binary>[iI])?(?P<qty>B|b|[bB][iI][tT][sS]?)?$")


class RateError(ValueError):
    """Text that is not a rate, or a rate outside what the daemon accepts."""


def _unit_multiplier(unit: str, original: str) -> Fraction:
    """Bytes per second for one of `unit` (already stripped of a trailing '/s')."""
    if unit.lower().endswith("ps"):
        raise RateError(
            f"{original!r} is ambiguous: '…ps' means bits to network vendors but bytes to tc; "
            f"write bits as e.g. '10mbit' or bytes as e.g. '10MB/s'"
        )
    m = _UNIT_RE.match(unit)
    if m is None:
        raise RateError(
            f"{original!r}: unknown unit {unit!r}; use B, K/KB, M/MB, G/GB, T/TB (decimal bytes), "
            f"KiB, MiB, GiB, TiB (binary bytes) or kbit, mbit, gbit (decimal bits)"
        )
    prefix, binary, qty = m.group("prefix"), m.group("binary"), m.group("qty")
    if binary and not prefix:
        raise RateError(f"{original!r}: 'i' needs a prefix, as in KiB or MiB")
    if qty == "b":
        ex = (prefix or "").upper()
        raise RateError(
            f"{original!r} is ambiguous: lowercase 'b' could mean bits or bytes; "
            f"write '{ex}{'i' if binary else ''}bit' for bits or '{ex}{'i' if binary else ''}B' "
            f"for bytes"
        )
    if binary and qty is None:
        raise RateError(f"{original!r}: write {prefix.upper()}iB (bytes) or {prefix.upper()}ibit "
                        f"(bits)")
    power = _PREFIXES[prefix.lower()] if prefix else 0
    base = 1024 if binary else 1000
    mult = Fraction(base**power)
    if qty is not None and qty.lower().startswith("bit"):
        mult /= 8
    return mult


def parse_rate(text: str, *, check: bool = True) -> int:
    """Parse a human rate into whole bytes per second (0 = unlimited).

    With ``check`` (the default) the result must also be a rate the daemon accepts:
    0 or RATE_MIN..RATE_MAX.  Raises :class:`RateError` with a message meant for people.
    """
    if not isinstance(text, str):
        raise RateError(f"a rate must be text, not {type(text).__name__}")
    stripped = text.strip()
    if stripped.lower() in _UNLIMITED_WORDS:
        return 0
    m = _NUMBER_RE.match(stripped)
    if m is None:
        if stripped.startswith(("-", "+")):
            raise RateError(f"{text!r}: a rate cannot have a sign")
        raise RateError(
            f"{text!r} is not a rate; examples: 50K, 1.5M, 512KiB/s, 10mbit, 0 (= unlimited)"
        )
    unit = m.group("unit")
    for suffix in ("/s", "/S", "/sec"):
        if unit.endswith(suffix):
            unit = unit[: -len(suffix)]
            break
    if "/" in unit:
        raise RateError(f"{text!r}: only '/s' may follow the unit")
    num = m.group("num")
    value = Fraction(num if not num.endswith(".") else num[:-1]) * _unit_multiplier(unit, text)
    result = math.floor(value + Fraction(1, 2))  # nearest whole byte/s, halves up
    if value > 0 and result == 0:
        raise RateError(f"{text!r} is less than one byte per second")
    if check:
        check_rate(result, text)
    return result


def check_rate(rate: int, text: str | None = None) -> int:
    """Raise RateError unless `rate` is 0 or within RATE_MIN..RATE_MAX (the contract's range)."""
    shown = repr(text) if text is not None else f"{rate} B/s"
    if rate == 0 or RATE_MIN <= rate <= RATE_MAX:
        return rate
    if rate < RATE_MIN:
        raise RateError(
            f"{shown} = {rate} B/s is below the smallest limit, 1KiB/s (1024 B/s); "
            f"use 0 or 'unlimited' for no limit"
        )
    raise RateError(f"{shown} = {rate} B/s is above the largest limit, 1TiB/s (2^40 B/s)")


_DECIMAL_UNITS = ("B/s", "KB/s", "MB/s", "GB/s", "TB/s")


def format_rate(bps: float) -> str:
    """A measured rate for display, decimal units, one decimal: ``48.2 KB/s``, ``512 B/s``."""
    return _format_decimal(bps, "/s")


def format_bytes(n: float) -> str:
    """A byte count for display, decimal units, one decimal: ``12.3 MB``, ``512 B``."""
    return _format_decimal(n, "")


def _format_decimal(value: float, per: str) -> str:
    if value is None or not math.isfinite(value) or value < 0:
        return "?"
    if round(value) < 1000:
        return f"{round(value)} B{per}"
    for power in range(1, len(_DECIMAL_UNITS)):
        scaled = value / 1000**power
        if round(scaled, 1) < 1000 or power == len(_DECIMAL_UNITS) - 1:
            return f"{scaled:.1f} {_PREFIX_NAMES[power - 1]}B{per}"
    raise AssertionError("unreachable")


def format_limit(rate: int) -> str:
    """A limit for display, exactly, in the shortest unit: ``50 KB/s``, ``50 KiB/s``, ``unlimited``.

    ``parse_rate(format_limit(n)) == n`` for every integer n >= 0.
    """
    rate = int(rate)
    if rate < 0:
        raise ValueError("a limit cannot be negative")
    if rate == 0:
        return "unlimited"
    best = f"{rate} B/s"
    best_len = len(str(rate))
    for power in range(4, 0, -1):  # larger units win ties: '1.25 MB/s', not '1250 KB/s'
        for base, infix in ((1000, ""), (1024, "i")):
            mult = base**power
            if rate < mult:
                continue
            number = _exact_short(rate, mult)
            if number is not None and len(number) < best_len:
                best, best_len = f"{number} {_PREFIX_NAMES[power - 1]}{infix}B/s", len(number)
    return best


def _exact_short(rate: int, mult: int, max_decimals: int = 3) -> str | None:
    """rate/mult written exactly with at most `max_decimals` decimals, or None."""
    for decimals in range(max_decimals + 1):
        scaled = rate * 10**decimals
        if scaled % mult == 0:
            whole = scaled // mult
            if decimals == 0:
                return str(whole)
            s = str(whole).rjust(decimals + 1, "0")
            return f"{s[:-decimals]}.{s[-decimals:]}"
    return None
