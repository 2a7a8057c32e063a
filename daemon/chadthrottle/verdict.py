"""Is a limit working?  Pure logic shared by GetStats' `status` and the journal diagnostics.

Thresholds come from the diagnostics users know: ratio > 1.5 -> THROTTLE NOT WORKING,
program never called while traffic flows -> eBPF program NOT BEING CALLED.

``not-dropping`` keeps its name (the contract's status value) and its meaning — over the
limit with no enforcement acting — now that a limit is held by shaping: a flow that pacing
or its queue hold never exceeds the limit by 10 %, so being over by more than that with no
drop means neither pacing, the queue nor the backstop acted.  A flow held at its limit by
pacing alone, with no drop at all, is ``throttled``.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import names

NOT_WORKING_RATIO = 1.5
OVER_LIMIT_RATIO = 1.1

# worst first
_SEVERITY = [
    names.STATUS_PROGRAM_NOT_CALLED,
    names.STATUS_NOT_DROPPING,
    names.STATUS_NOT_WORKING,
    names.STATUS_THROTTLED,
    names.STATUS_UNLIMITED,
]


@dataclass(frozen=True)
class Window:
    """What one direction did over one window."""

    limit: int  # bytes/s, 0 = unlimited
    rate: float  # bytes/s the BPF program passed
    calls: int  # program invocations in the window
    dropped: int  # packets dropped in the window
    socket_rate: float = 0.0  # bytes/s the process's TCP sockets moved (kernel's own count)


def actual_rate(w: Window) -> float:
    """The BPF count when the program sees the traffic, else the sockets' own count."""
    return w.rate if w.calls else w.socket_rate


def ratio(w: Window) -> float:
    return actual_rate(w) / w.limit if w.limit else 0.0


def classify(w: Window) -> str:
    if not w.limit:
        return names.STATUS_UNLIMITED
    if w.calls == 0 and w.socket_rate > 0:
        return names.STATUS_PROGRAM_NOT_CALLED
    r = ratio(w)
    if r > OVER_LIMIT_RATIO and w.dropped == 0:
        return names.STATUS_NOT_DROPPING
    if r > NOT_WORKING_RATIO:
        return names.STATUS_NOT_WORKING
    return names.STATUS_THROTTLED


def worst(statuses: list[str]) -> str:
    """The status of a process is that of its worst limited direction."""
    present = [s for s in statuses if s != names.STATUS_UNLIMITED]
    if not present:
        return names.STATUS_UNLIMITED
    return min(present, key=_SEVERITY.index)
