"""Pacing TCP sockets to their share of a limit.

The kernel does the pacing (TCP's own pacing timer, no fq qdisc needed) and the dividing
(sock_ops: at connect, at establishment and on every RTT sample each socket re-reads its
share: the budget's rate over its sockets active in the last 100 ms).  User space decides
two things: the segment size of new connections under low limits (``mss_for``), and when
every socket must be re-paced at once (``Pacer.repace``: a limit set on running
processes, raised, lowered or cleared).
"""

from __future__ import annotations

import ctypes
import logging

from .. import abi, names

log = logging.getLogger("chadthrottle.pacing")

#: TCP refuses a smaller TCP_MAXSEG
TCP_MIN_MSS = 88
#: a segment should be at most this fraction of a second of the rate, so 0.25 s of traffic
#: holds at least 16 segments and the flow looks flat at that scale; TCP sends its first 10
#: segments unpaced, which this keeps within 0.16 s of the rate
SEGMENTS_PER_SECOND = 64
#: above this a segment of a loopback MTU (65483 bytes) is small enough already
MAX_SEGMENT = 65483
#: the largest packet the packet path sees (a GSO/GRO super-packet)
GSO_MAX = 65536
#: the backstop bucket lets a packet through while its debt is within this many segments:
#: TCP's unpaced first 10 segments and its pacing timer's jitter fit, so a paced flow never
#: meets the backstop; the debt is paid back at the rate (the average stays exact)
SLACK_SEGMENTS = 12


def segment_for(rate: int) -> int:
    """The MSS a new connection limited to `rate` bytes/s gets (0: leave it alone)."""
    if not rate:
        return 0
    seg = rate // SEGMENTS_PER_SECOND
    if seg >= MAX_SEGMENT:
        return 0
    return max(TCP_MIN_MSS, seg)


def slack_for(rate: int, mss: int) -> int:
    """Debt (bytes) the backstop bucket of `rate` admits packets at."""
    if not rate:
        return 0
    return SLACK_SEGMENTS * (mss or GSO_MAX)


def mss_for(download: int, upload: int) -> int:
    """The MSS for new connections of a limit: the smallest any limited direction needs
    (one TCP_MAXSEG bounds both directions of a connection)."""
    segs = [s for s in (segment_for(download), segment_for(upload)) if s]
    return min(segs) if segs else 0


class Pacer:
    def __init__(self, kernel) -> None:
        self._kernel = kernel

    def repace(self) -> int:
        """Re-pace every TCP socket in the daemon's network namespace whose limit changed,
        release those whose limit is gone; returns how many sockets are limited."""
        caps = caps_of(self._kernel.iterate(names.PROG_ITER_TCP, 0))
        if any(c.limited == CAPS_AGAIN for c in caps):
            # a connection older than its limit was registered for pacing its local sender,
            # which this pass may have visited already
            caps = caps_of(self._kernel.iterate(names.PROG_ITER_TCP, 0))
        n = sum(c.limited == 1 for c in caps)
        log.debug("re-paced: %d limited TCP socket(s)", n)
        return n

    def release_orphans(self) -> int:
        """Release the TCP sockets an earlier daemon paced and could not release (it was
        killed: their tags went with its maps, their caps stayed); returns how many."""
        caps = caps_of(self._kernel.iterate(names.PROG_ITER_TCP, abi.ITER_ORPHANS))
        n = sum(c.limited == CAPS_ORPHAN for c in caps)
        if n:
            log.info("released %d connection(s) an earlier chadthrottled left paced", n)
        return n


#: caps.limited of iter/tcp's "run me again" record (CT_CAPS_AGAIN in the BPF program)
CAPS_AGAIN = 2
#: ... and of its record per socket released for an earlier daemon (CT_CAPS_ORPHAN)
CAPS_ORPHAN = 3


class PacedCaps(ctypes.Structure):
    """The caps record iter/tcp writes per limited socket (struct caps)."""

    _fields_ = [("pace", ctypes.c_uint32), ("clamp", ctypes.c_uint32),
                ("limited", ctypes.c_uint32), ("cwnd", ctypes.c_uint32)]


def caps_of(raw: bytes) -> list[PacedCaps]:
    size = ctypes.sizeof(PacedCaps)
    return [PacedCaps.from_buffer_copy(raw, i) for i in range(0, len(raw) - size + 1, size)]

