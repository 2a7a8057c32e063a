"""Accuracy of the limiter with real clients on loopback.

For each case a real client runs about 10 s under a limit set before its first packet:
curl downloading from a local HTTP server, iperf3 downloading (-R) and uploading.  The
achieved rate is measured outside the limiter (the client's own output, or iperf3's
receiver report); ``ratio`` is steady state (seconds 2..end), ``first_second_ratio`` the
first second alone, ``retransmits`` the kernel's RetransSegs delta.  One more case: an
unlimited curl next to a limited one in the same cgroup, against the same curl alone.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from ..engine import Engine
from . import report
from .traffic import HttpServer, Iperf3, Transfer, curl_download, retransmits, series_rate

KiB, MiB = 1 << 10, 1 << 20
LIMITS = (50 * KiB, 1 * MiB, 20 * MiB)
BIN = 0.25


@dataclass
class Result:
    direction: str
    client: str
    limit: int
    achieved: float
    first: float
    retrans: int
    series: list[tuple[float, float]]  # (bin start, bytes/s) in BIN bins

    def row(self) -> dict:
        return {"bench": "accuracy", "direction": self.direction, "client": self.client,
                "limit_bps": self.limit, "achieved_bps": round(self.achieved, 1),
                "ratio": round(self.achieved / self.limit, 4),
                "first_second_ratio": round(self.first / self.limit, 4),
                "retransmits": self.retrans}


def run_curl(eng: Engine, srv: HttpServer, limit: int, seconds: float) -> Result:
    r0 = retransmits()
    t = Transfer(curl_download(srv.url(int(limit * seconds * 4) + MiB), seconds),
                 max_seconds=seconds, start_paused=True)
    with t:
        eng.set_limit(t.pid, limit, 0)
        t.release()
        time.sleep(seconds)
        t.stop()
    bins = [(i * BIN, t.rate(i * BIN, (i + 1) * BIN)) for i in range(int(seconds / BIN))]
    return Result("download", "curl", limit, t.rate(2, seconds), t.rate(0, 1),
                  retransmits() - r0, bins)


def run_iperf3(eng: Engine, limit: int, seconds: float, download: bool) -> Result:
    r0 = retransmits()
    with Iperf3(seconds=seconds, reverse=download, interval=BIN) as ip:
        eng.set_limit(ip.pid, limit if download else 0, 0 if download else limit)
        ip.wait_test_end()
        eng.clear_limit(ip.pid)
        res = ip.result()
    iv = res["intervals"]
    bins = []
    prev = 0.0
    for end, nbytes in iv:
        bins.append((prev, nbytes / max(end - prev, 1e-9)))
        prev = end
    return Result("download" if download else "upload", "iperf3", limit,
                  series_rate(iv, 2, seconds), series_rate(iv, 0, 1), retransmits() - r0, bins)


def run_neighbour(srv: HttpServer, seconds: float) -> dict:
    """An unlimited curl alone, then next to a limited curl in the same cgroup."""
    def free_rate() -> float:
        with Transfer(curl_download(srv.url(1 << 40), seconds), max_seconds=seconds) as t:
            time.sleep(seconds)
            t.stop()
            return t.rate(1, seconds)

    with Engine() as eng:
        alone = free_rate()
        lim = Transfer(curl_download(srv.url(1 << 40), seconds + 2), max_seconds=seconds + 2,
                       start_paused=True)
        with lim:
            eng.set_limit(lim.pid, 1 * MiB, 0)
            lim.release()
            beside = free_rate()
    return {"bench": "accuracy", "case": "neighbour", "limit_bps": 1 * MiB,
            "alone_bps": round(alone, 1), "beside_limited_bps": round(beside, 1),
            "ratio": round(beside / alone, 4)}


def plot(results: list[Result], outdir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    for direction in ("download", "upload"):
        rs = [r for r in results if r.direction == direction]
        if not rs:
            continue
        fig, axes = plt.subplots(len(rs), 1, figsize=(9, 2.3 * len(rs)), squeeze=False)
        for ax, r in zip(axes[:, 0], rs, strict=True):
            xs = [b[0] for b in r.series]
            ys = [b[1] / r.limit for b in r.series]
            ax.step(xs, ys, where="post", label="achieved (0.25 s bins)")
            ax.axhline(1.0, color="red", linestyle="--", label="limit")
            ax.axvspan(0, 1, color="orange", alpha=0.12, label="first second")
            ax.set_ylabel("rate / limit")
            ax.set_ylim(0, max(3.0, max(ys, default=1) * 1.05))
            ax.set_title(f"{direction} · {r.client} · limit {report.human_rate(r.limit)} · "
                         f"steady {r.achieved / r.limit:.3f}× · first s "
                         f"{r.first / r.limit:.2f}×", fontsize=9)
            ax.grid(alpha=0.3)
        axes[0, 0].legend(loc="upper right", fontsize=7)
        axes[-1, 0].set_xlabel("seconds since the client started")
        fig.tight_layout()
        path = outdir / f"accuracy-{direction}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m chadthrottle.bench accuracy")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--plot", metavar="DIR", help="write accuracy-{download,upload}.png here")
    ap.add_argument("--limits", default=",".join(str(x) for x in LIMITS),
                    help="comma-separated limits in bytes/s")
    a = ap.parse_args(argv)
    limits = [int(x) for x in a.limits.split(",")]
    results: list[Result] = []
    with HttpServer() as srv:
        for limit in limits:
            cases = [lambda e, lim=limit: run_curl(e, srv, lim, a.seconds),
                     lambda e, lim=limit: run_iperf3(e, lim, a.seconds, True),
                     lambda e, lim=limit: run_iperf3(e, lim, a.seconds, False)]
            for case in cases:
                with Engine() as eng:
                    r = case(eng)
                results.append(r)
                if a.json:
                    report.emit_json(r.row())
        neighbour = run_neighbour(srv, min(a.seconds, 5.0))
    if a.json:
        report.emit_json(neighbour)
    else:
        results.sort(key=lambda r: (r.direction, r.client, r.limit))
        report.table(
            f"accuracy (loopback, {a.seconds:.0f} s per case, steady = seconds 2..end)",
            ["direction", "client", "limit", "achieved", "ratio", "first s", "retransmits"],
            [(r.direction, r.client, report.human_rate(r.limit), report.human_rate(r.achieved),
              f"{r.achieved / r.limit:.3f}", f"{r.first / r.limit:.2f}", r.retrans)
             for r in results])
        print(f"neighbour (unlimited curl beside a 1 MiB/s-limited one, same cgroup): "
              f"{report.human_rate(neighbour['beside_limited_bps'])} vs "
              f"{report.human_rate(neighbour['alone_bps'])} alone, ratio {neighbour['ratio']:.3f}")
    if a.plot:
        for p in plot(results, Path(a.plot)):
            print(f"wrote {p}")
    return 0
