"""Cost of the programs on traffic that is not limited.

An unlimited iperf3 transfer on loopback runs with the programs attached at the cgroup2
root (every packet of the machine goes through them, no limit set) and detached,
alternating in the same run so both see the same machine.  ns per packet comes from the
kernel's own bpf_stats (run_time_ns / run_cnt of the ingress and egress programs), measured
for ours and, in the same run, for programs that do nothing (``bpf/floor.bpf.c``) attached at
the same place: the floor is what running any cgroup_skb program costs on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
from importlib import resources
from pathlib import Path

from .. import cgroups, libbpf, names
from ..bpfobject import BpfObject
from ..engine import Engine
from . import report
from .traffic import Iperf3, series_rate

BPF_STATS_RUN_TIME = 0


def _prog_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program, from its fdinfo."""
    info = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        k, _, v = line.partition(":")
        info[k.strip()] = v.strip()
    return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))


def _bulk(seconds: float, extra: list[str]) -> float:
    with Iperf3(seconds=seconds, interval=0.5, extra=extra) as ip:
        res = ip.result()
    return series_rate(res["intervals"], 0.5, seconds)


def measure(workload: str, extra: list[str], rounds: int, seconds: float) -> dict:
    """Throughput ratio from alternating rounds with kernel stats off (they cost two clock
    reads per run), then one more attached run with bpf_stats on for ns per packet."""
    with_bps: list[float] = []
    without_bps: list[float] = []
    for _ in range(rounds):
        without_bps.append(_bulk(seconds, extra))
        with Engine(monitor_root=True):
            with_bps.append(_bulk(seconds, extra))
    stats_fd = libbpf.check(libbpf.lib().bpf_enable_stats(BPF_STATS_RUN_TIME), "enable stats")
    try:
        with Engine(monitor_root=True) as eng:
            fds = [eng.program_fd(p) for p in (names.PROG_INGRESS, names.PROG_EGRESS)]
            before = [_prog_stats(fd) for fd in fds]
            _bulk(seconds, extra)
            after = [_prog_stats(fd) for fd in fds]
    finally:
        os.close(stats_fd)
    run_ns = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    run_cnt = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    floor_ns, floor_cnt = _floor(seconds, extra)
    w, wo = statistics.median(with_bps), statistics.median(without_bps)
    ours = round(run_ns / run_cnt, 1) if run_cnt else None
    floor = round(floor_ns / floor_cnt, 1) if floor_cnt else None
    return {"bench": "overhead", "workload": workload, "with_bps": round(w, 1),
            "without_bps": round(wo, 1), "ratio": round(w / wo, 4),
            "ns_per_packet": ours, "packets": run_cnt, "floor_ns_per_packet": floor,
            "over_floor_ns": round(ours - floor, 1) if ours and floor else None,
            "rounds": rounds}


def _floor(seconds: float, extra: list[str]) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of programs that do nothing, attached at the cgroup2 root for
    one transfer, with bpf_stats on."""
    path = Path(str(resources.files("chadthrottle") / "data" / "floor.bpf.o"))
    root = cgroups.cgroup2_mount()
    stats_fd = libbpf.check(libbpf.lib().bpf_enable_stats(BPF_STATS_RUN_TIME), "enable stats")
    try:
        with BpfObject(path) as obj:
            for p in ("floor_ingress", "floor_egress"):
                obj.attach_cgroup(p, root)
            fds = [obj.program_fd(p) for p in ("floor_ingress", "floor_egress")]
            before = [_prog_stats(fd) for fd in fds]
            _bulk(seconds, extra)
            after = [_prog_stats(fd) for fd in fds]
    finally:
        os.close(stats_fd)
    return (sum(a[0] - b[0] for a, b in zip(after, before, strict=True)),
            sum(a[1] - b[1] for a, b in zip(after, before, strict=True)))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m chadthrottle.bench overhead")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    a = ap.parse_args(argv)
    rows = [measure("bulk", [], a.rounds, a.seconds),
            measure("1400-byte writes, TCP_NODELAY", ["-l", "1400", "-N"], a.rounds, a.seconds)]
    if a.json:
        for r in rows:
            report.emit_json(r)
        return 0
    report.table(
        f"overhead (loopback iperf3, programs at the cgroup2 root vs detached, median of "
        f"{a.rounds} alternating rounds of {a.seconds:.0f} s)",
        ["case", "with", "without", "ratio", "ns/packet (bpf_stats)", "no-op floor",
         "over the floor", "packets"],
        [(r["workload"], report.human_rate(r["with_bps"]), report.human_rate(r["without_bps"]),
          f"{r['ratio']:.3f}", r["ns_per_packet"], r["floor_ns_per_packet"],
          r["over_floor_ns"], r["packets"]) for r in rows])
    return 0



