"""Every 5 seconds, for each limited process: actual vs limit, verdict, eBPF counters.

Two lines per limited direction, as users know them from the seed design note::

    PID 12345 (wget) download: actual=48.2 KB/s, limit=50.0 KB/s, ratio=0.96x ✅ THROTTLED
    eBPF stats PID 12345 cgroup / download: program_calls=15234, packets=5000, \
dropped=4500 (90.0%), bytes=512000, bytes_dropped=460800

A limit a rule holds names the rule after the limit (``limit=50.0 KB/s (rule wget)``), and
both lines then carry CHADTHROTTLE_RULE.

Both carry structured journal fields (CHADTHROTTLE_PID, CHADTHROTTLE_DIRECTION,
CHADTHROTTLE_RATIO, CHADTHROTTLE_STATUS, ...), so ``journalctl CHADTHROTTLE_PID=12345``
selects one process and ``journalctl CHADTHROTTLE_RULE=wget`` one rule.  "actual" is the
average over the interval since the previous report (cumulative byte counters), not a
one-second sample.

Verdicts come from chadthrottle.verdict (shared with GetStats' ``status``), applied to the
interval's own counters:
  traffic flows but the program never ran for it -> ⚠️ eBPF program NOT BEING CALLED
  over the limit (ratio > 1.1) and no drop       -> ⚠️ NOT ENFORCING (nothing paced, queued
                                                    or dropped it: see verdict.py)
  ratio > 1.5                                     -> ⚠️ THROTTLE NOT WORKING
  otherwise                                       -> ✅ THROTTLED
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .. import names, verdict
from ..safetext import printable as safe

log = logging.getLogger("chadthrottle.diagnostics")

INTERVAL = 5.0

VERDICT_TEXT = {
    names.STATUS_THROTTLED: "✅ THROTTLED",
    names.STATUS_NOT_WORKING: "⚠️ THROTTLE NOT WORKING",
    names.STATUS_PROGRAM_NOT_CALLED: "⚠️ eBPF program NOT BEING CALLED",
    names.STATUS_NOT_DROPPING:
        "⚠️ NOT ENFORCING (over the limit; nothing paced, queued or dropped)",
    names.STATUS_UNLIMITED: "(unlimited)",
}
DIRECTIONS = ("download", "upload")
F = names.JOURNAL_FIELD_PREFIX


def format_rate(bytes_per_s: float) -> str:
    """48.2 KB/s (K = 1024, as in the seed: a 51200 B/s limit prints 50.0 KB/s)."""
    value = float(bytes_per_s) / 1024.0
    for unit in ("KB/s", "MB/s", "GB/s"):
        if value < 1024.0 or unit == "GB/s":
            return f"{value:.1f} {unit}"
        value /= 1024.0
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Line:
    message: str
    fields: dict[str, str]
    level: int = logging.INFO


def lines_for(st, direction: str, win: verdict.Window) -> list[Line]:
    """The two report lines of one limited direction of one process (pure: testable).

    ``st`` is the engine's ProcessStats (cumulative counters), ``win`` what that direction
    did over the report interval.
    """
    limit = int(getattr(st, f"{direction}_limit"))
    passed = int(getattr(st, f"{direction}_packets", 0) or 0)
    dropped = int(getattr(st, f"{direction}_dropped", 0) or 0)
    nbytes = int(getattr(st, f"{direction}_bytes", 0) or 0)
    dropped_bytes = int(getattr(st, f"{direction}_dropped_bytes", 0) or 0)
    calls = int(getattr(st, f"{direction}_calls", 0) or st.program_calls)
    rate = verdict.actual_rate(win)
    ratio = verdict.ratio(win)
    status = verdict.classify(win)
    common = {"PID": str(st.pid), "COMM": st.comm, "CGROUP": st.cgroup, "DIRECTION": direction}
    rule = str(getattr(st, "rule", "") or "")
    if rule:
        common["RULE"] = rule
    rate_fields = {F + k: v for k, v in common.items()}
    rate_fields.update({
        F + "KIND": "rate",
        F + "RATE": f"{rate:.0f}",
        F + "LIMIT": str(limit),
        F + "RATIO": f"{ratio:.2f}",
        F + "STATUS": status,
    })
    level = logging.INFO if status == names.STATUS_THROTTLED else logging.WARNING
    msg = (
        f"PID {st.pid} ({st.comm}) {direction}: actual={format_rate(rate)}, "
        f"limit={format_rate(limit)}{f' (rule {safe(rule)})' if rule else ''}, "
        f"ratio={ratio:.2f}x {VERDICT_TEXT[status]}"
    )
    packets = passed + dropped  # every packet the program judged
    pct = 100.0 * dropped / packets if packets else 0.0
    ebpf_fields = {F + k: v for k, v in common.items()}
    sockets = int(getattr(st, f"{direction}_sockets", 0) or 0)
    ebpf_fields.update({
        F + "KIND": "ebpf",
        F + "STATUS": status,
        F + "PROGRAM_CALLS": str(calls),
        F + "PACKETS": str(packets),
        F + "DROPPED": str(dropped),
        F + "BYTES": str(nbytes),
        F + "BYTES_DROPPED": str(dropped_bytes),
        F + "SOCKETS": str(sockets),
    })
    # the shaping state: sockets sharing the rate (paced), and a remote download's queue
    shaping = f", sockets={sockets}"
    if direction == "download":
        queued = int(getattr(st, "download_queued", 0) or 0)
        qdrops = int(getattr(st, "download_queue_dropped", 0) or 0)
        ebpf_fields[F + "QUEUED"] = str(queued)
        ebpf_fields[F + "QUEUE_DROPPED"] = str(qdrops)
        shaping += f", queued={queued}, queue_dropped={qdrops}"
    ebpf = (
        f"eBPF stats PID {st.pid} cgroup {st.cgroup} {direction}: program_calls={calls}, "
        f"packets={packets}, dropped={dropped} ({pct:.1f}%), bytes={nbytes}, "
        f"bytes_dropped={dropped_bytes}{shaping}"
    )
    return [Line(msg, rate_fields, level), Line(ebpf, ebpf_fields, logging.INFO)]


class Diagnostics:
    """Keeps the previous counters so each report averages over its own interval."""

    def __init__(self, engine, clock=time.monotonic) -> None:
        self._engine = engine
        self._clock = clock
        self._prev: dict[tuple[int, str], tuple[float, tuple[int, int, int]]] = {}

    def report(self) -> list[Line]:
        now = self._clock()
        out: list[Line] = []
        seen = set()
        # idle limits (no packet, no socket traffic) are counted, not reported one by one:
        # with thousands of limits the journal would get thousands of lines every 5 s
        active = self._engine.active_limits()
        idle = len(self._engine.budgets.by_root) - len(active)
        if idle:
            out.append(Line(f"{idle} limited process(es) idle (no traffic in the last window)",
                            {F + "KIND": "idle", F + "IDLE_LIMITS": str(idle)}, logging.INFO))
        for pid in active:
            try:
                st = self._engine.stats(pid)
            except Exception:  # exited between list and stats: reap() will announce it
                log.debug("no stats for %d", pid, exc_info=True)
                continue
            for direction in DIRECTIONS:
                limit = int(getattr(st, f"{direction}_limit"))
                if not limit:
                    continue
                key = (pid, direction)
                seen.add(key)
                cur = (
                    int(getattr(st, f"{direction}_bytes")),
                    int(getattr(st, f"{direction}_calls", 0)),
                    int(getattr(st, f"{direction}_dropped")),
                )
                socket_rate = float(getattr(st, f"{direction}_socket_rate", 0.0))
                prev = self._prev.get(key)
                if prev is not None and now > prev[0] and all(
                        c >= p for c, p in zip(cur, prev[1], strict=True)):
                    dt = now - prev[0]
                    win = verdict.Window(limit, (cur[0] - prev[1][0]) / dt,
                                         cur[1] - prev[1][1], cur[2] - prev[1][2], socket_rate)
                else:  # first report of this limit: the engine's own window
                    win = verdict.Window(limit, float(getattr(st, f"{direction}_rate")),
                                         cur[1], cur[2], socket_rate)
                self._prev[key] = (now, cur)
                out.extend(lines_for(st, direction, win))
        for key in set(self._prev) - seen:
            del self._prev[key]
        return out

    def emit(self) -> int:
        lines = self.report()
        for line in lines:
            log.log(line.level, "%s", line.message, extra={"journal": line.fields})
        return len(lines)
