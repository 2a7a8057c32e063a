"""The home link: "I limit Steam so my call gets the rest".

Two network namespaces joined by a veth; the far side is a server whose egress is the
bottleneck (a tbf at LINK bytes/s, its queue gives the RTT), the near side runs the limiter
and two downloads from that server: one limited to LIMIT, one unlimited.  The far side is
treated as another machine (its sockets are not paced as local senders), so what is
measured is the remote-sender path: the limited flow's packets wait in its queue on the
near side's device, and its receive window is bounded.

Measured, side by side in one run: the link's own capacity (one unlimited download alone),
then both downloads with the daemon's shaping, then the same with the queue off (the
backstop bucket alone, as a policer):
* the limited flow's ratio (its own bytes, seconds 3..end);
* the unlimited neighbour's throughput against capacity − limit;
* bytes dropped by our programs against bytes delivered, packets dropped by the queue;
* retransmissions of each flow (ss on the server's side).
"""

from __future__ import annotations

import re
import select
import subprocess
import time
from dataclasses import dataclass

from ..engine import Engine
from .netns import HomeLink, inside
from .traffic import HttpServer, Transfer, curl_download

MiB = 1 << 20
LINK = 8 * MiB
LIMIT = 2 * MiB
SECONDS = 12.0
STEADY_FROM = 3.0


@dataclass
class Flow:
    rate: float
    retrans: int


def _pump(eng: Engine | None, seconds: float) -> None:
    """Wait, acting on the engine's kernel events at once (as the daemon's loop does)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if eng is None:
            time.sleep(left)
            continue
        if select.select([eng.events_fd], [], [], min(left, 0.05))[0]:
            eng.handle_events()


def _client_port(pid: int) -> int | None:
    """The local port of a process's TCP connection (this namespace)."""
    out = subprocess.run(["ss", "-tnpH"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if f"pid={pid}," in line:
            local = line.split()[3]
            return int(local.rsplit(":", 1)[1])
    return None


def _server_retrans(link: HomeLink, ports: dict[str, int | None]) -> dict[str, int]:
    """Retransmitted segments of each connection, read on the sender's side."""
    out = subprocess.run(["ip", "netns", "exec", link.far, "ss", "-tinH"],
                         capture_output=True, text=True).stdout.splitlines()
    got = {k: 0 for k in ports}
    for i, line in enumerate(out):
        fields = line.split()
        if len(fields) < 5:
            continue
        peer = fields[4]
        for name, port in ports.items():
            if port and peer.endswith(f":{port}"):
                info = out[i + 1] if i + 1 < len(out) else ""
                m = re.search(r"retrans:\d+/(\d+)", info)
                got[name] = int(m.group(1)) if m else 0
    return got


def _alone(link: HomeLink, url: str, seconds: float) -> float:
    with Transfer(curl_download(url, seconds), max_seconds=seconds) as t:
        time.sleep(seconds)
        t.stop()
    return t.rate(2, seconds)


def _pair(link: HomeLink, url: str, *, queues: bool, limit: int, seconds: float) -> dict:
    with Engine(pace_local_peers=False, queues=queues) as eng:
        lim = Transfer(curl_download(url, seconds + 1), max_seconds=seconds + 1,
                       start_paused=True)
        with lim:
            eng.set_limit(lim.pid, limit, 0)
            lim.release()
            _pump(eng, 1.0)
            with Transfer(curl_download(url, seconds), max_seconds=seconds) as free:
                _pump(eng, 0.5)
                ports = {"limited": _client_port(lim.pid), "unlimited": _client_port(free.pid)}
                _pump(eng, seconds - 0.5)
                retrans = _server_retrans(link, ports)
                b = eng.budgets.by_bid[eng.limit_of(lim.pid).budget]
                cur = eng.budgets.read(b.bid)
                qstats = eng.queues.stats(b.bid) if eng.queues is not None else (0, 0)
                devices = eng.queues.devices if eng.queues is not None else []
                free.stop()
            lim.stop()
    dn = cur.dir[0]
    return {
        "queues": queues,
        "limited_bps": lim.rate(STEADY_FROM + 1, seconds),
        "neighbour_bps": free.rate(STEADY_FROM, seconds - 1),
        "dropped_bytes": dn.dropped_bytes, "delivered_bytes": dn.passed_bytes,
        "queue_drops": qstats[1], "retrans_limited": retrans["limited"],
        "retrans_unlimited": retrans["unlimited"], "devices": devices,
    }


def measure(link_rate: int = LINK, limit: int = LIMIT, seconds: float = SECONDS) -> list[dict]:
    out = []
    with HomeLink(link_rate) as link:
        with HttpServer(link.far_ip, prefix=["ip", "netns", "exec", link.far]) as srv:
            url = srv.url(1 << 40)
            with inside(link.near_path):
                capacity = _alone(link, url, 6.0)
                for queues in (True, False):
                    r = _pair(link, url, queues=queues, limit=limit, seconds=seconds)
                    r.update(bench="homelink", link_bps=link_rate, capacity_bps=round(capacity, 1),
                             limit_bps=limit, ratio=round(r["limited_bps"] / limit, 4),
                             neighbour_share=round(r["neighbour_bps"] / (capacity - limit), 4))
                    out.append(r)
    return out


def main(argv: list[str]) -> int:
    import argparse

    from . import report

    ap = argparse.ArgumentParser(prog="python -m chadthrottle.bench homelink",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--seconds", type=float, default=SECONDS)
    a = ap.parse_args(argv)
    rows = measure(seconds=a.seconds)
    if a.json:
        for r in rows:
            report.emit_json(r)
        return 0
    cap = rows[0]["capacity_bps"]
    report.table(
        f"home link: {report.human_rate(LINK)} bottleneck (capacity measured "
        f"{report.human_rate(cap)}), one download limited to {report.human_rate(LIMIT)}, one "
        f"unlimited neighbour, {a.seconds:.0f} s",
        ["case", "limited ratio", "neighbour / (capacity - limit)", "dropped by the bucket",
         "queue drops", "retransmits (limited)", "retransmits (neighbour)"],
        [("download queue" if r["queues"] else "bucket alone (policer)", f"{r['ratio']:.3f}",
          f"{r['neighbour_share']:.3f}",
          f"{r['dropped_bytes'] / max(r['delivered_bytes'], 1):.2%}", r["queue_drops"],
          r["retrans_limited"], r["retrans_unlimited"]) for r in rows])
    return 0
