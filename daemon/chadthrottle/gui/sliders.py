"""The limit editor's logarithmic slider, as plain arithmetic (no GTK).

The slider's value is log2 of the rate in bytes/s, from 1 KiB/s (the smallest limit the
daemon accepts) to 1 GiB/s; one step further right is "unlimited".  Positions snap to
eighths of a power of two (1, 1.125, 1.25 … MiB/s), so every rate the slider gives is one
that :func:`chadthrottle.units.format_limit` writes exactly and ``parse_rate`` reads back.
"""

from __future__ import annotations

import math

from chadthrottle.names import RATE_MIN

LOG_MIN = 10.0  # 2^10 = 1 KiB/s = RATE_MIN
LOG_MAX = 30.0  # 2^30 = 1 GiB/s: the largest the slider offers (the entry takes more)
LOG_UNLIMITED = 31.0  # the right end of the slider
STEPS_PER_OCTAVE = 8

#: the editor's preset buttons: (label, bytes/s); 0 = unlimited
PRESETS: tuple[tuple[str, int], ...] = (
    ("256 KiB/s", 256 * 1024),
    ("1 MiB/s", 1024 * 1024),
    ("5 MiB/s", 5 * 1024 * 1024),
    ("Unlimited", 0),
)

#: marks under the slider: (position, label or None); 1 GiB/s is one step from the
#: unlimited end, too close for two labels
MARKS: tuple[tuple[float, str | None], ...] = (
    (10.0, "1 KiB/s"),
    (20.0, "1 MiB/s"),
    (30.0, None),
    (LOG_UNLIMITED, "∞"),
)

assert 2 ** int(LOG_MIN) == RATE_MIN


def rate_to_position(rate: int) -> float:
    """Where the slider stands for a rate (0 = unlimited: the right end)."""
    if rate <= 0:
        return LOG_UNLIMITED
    return min(max(math.log2(rate), LOG_MIN), LOG_MAX)


def position_to_rate(position: float) -> int:
    """The rate at a slider position, snapped to an eighth of its power of two; past
    LOG_MAX (half-way to the unlimited end, or more) it is 0 = unlimited."""
    if position >= (LOG_MAX + LOG_UNLIMITED) / 2:
        return 0
    position = min(max(position, LOG_MIN), LOG_MAX)
    octave = math.floor(position)
    step = 2 ** octave // STEPS_PER_OCTAVE
    rate = int(round(2 ** position / step)) * step
    return max(RATE_MIN, min(rate, 2 ** int(LOG_MAX)))
