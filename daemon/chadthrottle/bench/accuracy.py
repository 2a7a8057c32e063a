"""Accuracy of the limiter with real clients on loopback, in a network namespace of its own
(so the retransmission counter counts this run's connections only).

For each limit a real client runs under a limit set before its first packet: curl
downloading and uploading (PUT) to a local HTTP server, iperf3 downloading (-R) and
uploading.  The achieved rate is measured outside the limiter: the client's own output
(curl download), the server's receive log (curl upload), iperf3's receiver report.  Per
case: ``ratio`` (seconds 2..end), ``first`` (the first second alone), ``bins`` (the share of
0.25 s bins after the first second within ±25 % of the limit), ``retransmits``.

Three more measures, side by side in the same run: low limits (1, 4, 16 KiB/s over 30 s,
download and upload); release (a limited download whose limit is cleared, or raised 20×:
its rate 0.5..1.5 s later against the old limit); and an unlimited download next to a
limited one in the same cgroup, against the same download alone.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..engine import Engine
from . import report
from .netns import enter_private_netns
from .traffic import (
    HttpServer,
    Iperf3,
    Transfer,
    curl_download,
    curl_upload,
    read_progress,
    retransmits,
    series_rate,
)

KiB, MiB = 1 << 10, 1 << 20
LIMITS = (50 * KiB, 1 * MiB, 20 * MiB)
LOW_LIMITS = (1 * KiB, 4 * KiB, 16 * KiB)
BIN = 0.25
BAND = 0.25


@dataclass
class Result:
    direction: str
    client: str
    limit: int
    seconds: float
    series: list[tuple[float, float]]  # (bin start, bytes/s) in BIN bins
    achieved: float
    first: float
    retrans: int
    case: str = "steady"
    extra: dict = field(default_factory=dict)

    @property
    def bins_ok(self) -> float:
        """Share of the bins after the first second within ±25 % of the limit."""
        after = [r for t, r in self.series if t >= 1.0 and t + BIN <= self.seconds - 0.5]
        if not after:
            return 0.0
        return sum(abs(r / self.limit - 1) <= BAND for r in after) / len(after)

    def row(self) -> dict:
        return {"bench": "accuracy", "case": self.case, "direction": self.direction,
                "client": self.client, "limit_bps": self.limit,
                "achieved_bps": round(self.achieved, 1),
                "ratio": round(self.achieved / self.limit, 4),
                "first_second_ratio": round(self.first / self.limit, 4),
                "bins_within_25pct": round(self.bins_ok, 3), "retransmits": self.retrans,
                **self.extra}


def _bins(rate_between, seconds: float) -> list[tuple[float, float]]:
    return [(i * BIN, rate_between(i * BIN, (i + 1) * BIN)) for i in range(int(seconds / BIN))]


def run_curl_download(eng: Engine, srv: HttpServer, limit: int, seconds: float,
                      case: str = "steady") -> Result:
    r0 = retransmits()
    t = Transfer(curl_download(srv.url(int(limit * seconds * 4) + MiB), seconds),
                 max_seconds=seconds, start_paused=True)
    with t:
        eng.set_limit(t.pid, limit, 0)
        t.release()
        time.sleep(seconds)
        t.stop()
    return Result("download", "curl", limit, seconds, _bins(t.rate, seconds), t.rate(2, seconds),
                  t.rate(0, 1), retransmits() - r0, case)


def run_curl_upload(eng: Engine, srv: HttpServer, progress: Path, limit: int, seconds: float,
                    case: str = "steady") -> Result:
    r0 = retransmits()
    progress.write_text("")
    with tempfile.NamedTemporaryFile(prefix="chadthrottle-upload-") as f:
        f.truncate(int(limit * seconds * 4) + MiB)  # sparse: no disk is used
        f.flush()
        t = Transfer(curl_upload(srv.upload_url(), f.name, seconds), max_seconds=seconds,
                     start_paused=True)
        with t:
            eng.set_limit(t.pid, 0, limit)
            t0 = time.monotonic()
            t.release()
            time.sleep(seconds)
            t.stop()
    samples = read_progress(progress, t0)

    def rate(a: float, b: float) -> float:
        def at(x: float) -> int:
            got = 0
            for when, total in samples:
                if when > x:
                    break
                got = total
            return got
        return (at(b) - at(a)) / (b - a)

    return Result("upload", "curl", limit, seconds, _bins(rate, seconds), rate(2, seconds),
                  rate(0, 1), retransmits() - r0, case)


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
    return Result("download" if download else "upload", "iperf3", limit, seconds, bins,
                  series_rate(iv, 2, seconds), series_rate(iv, 0, 1), retransmits() - r0)


def run_release(eng: Engine, srv: HttpServer, limit: int, how: str) -> Result:
    """A download limited for 4 s, then its limit cleared (or raised 20×): its rate
    0.5..1.5 s after the change, against the old limit."""
    seconds = 7.0
    r0 = retransmits()
    t = Transfer(curl_download(srv.url(1 << 40), seconds), max_seconds=seconds,
                 start_paused=True)
    with t:
        eng.set_limit(t.pid, limit, 0)
        t.release()
        time.sleep(4.0)
        at = time.monotonic() - t.t0
        if how == "clear":
            eng.clear_limit(t.pid)
        else:
            eng.set_limit(t.pid, 20 * limit, 0)
        time.sleep(seconds - 4.0)
        t.stop()
    after = t.rate(at + 0.5, at + 1.5)
    r = Result("download", "curl", limit, seconds, _bins(t.rate, seconds), t.rate(2, at),
               t.rate(0, 1), retransmits() - r0, case=f"release-{how}",
               extra={"after_bps": round(after, 1), "after_ratio": round(after / limit, 2)})
    return r


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
    """One figure per direction: every case's 0.25 s bins as rate/limit (one line a case)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    outdir.mkdir(parents=True, exist_ok=True)
    written = []
    groups = {
        "accuracy-download": [r for r in results if r.case == "steady"
                              and r.direction == "download"],
        "accuracy-upload": [r for r in results if r.case == "steady" and r.direction == "upload"],
        "accuracy-low": [r for r in results if r.case == "low"],
    }
    for name, rs in groups.items():
        if not rs:
            continue
        fig, ax = plt.subplots(figsize=(10, 4.2))
        for r in rs:
            xs = [b[0] for b in r.series]
            ys = [b[1] / r.limit for b in r.series]
            ax.step(xs, ys, where="post", linewidth=1.1,
                    label=f"{r.direction} {r.client} {report.human_rate(r.limit)}: "
                          f"{r.achieved / r.limit:.3f}×")
        ax.axhline(1.0, color="black", linestyle="--", linewidth=0.8)
        ax.axhspan(1 - BAND, 1 + BAND, color="green", alpha=0.06)
        ax.set_ylim(0, 2.0)
        ax.set_ylabel("achieved / limit (0.25 s bins)")
        ax.set_xlabel("seconds since the client started (limit set before its first packet)")
        ax.set_title(f"{name.replace('accuracy-', '')}: one line per case (ratio = seconds 2..end)",
                     fontsize=10)
        ax.legend(loc="upper right", fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = outdir / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m chadthrottle.bench accuracy")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--low-seconds", type=float, default=30.0)
    ap.add_argument("--plot", metavar="DIR", help="write accuracy-*.png here")
    ap.add_argument("--limits", default=",".join(str(x) for x in LIMITS),
                    help="comma-separated limits in bytes/s")
    ap.add_argument("--low-limits", default=",".join(str(x) for x in LOW_LIMITS),
                    help="comma-separated low limits in bytes/s ('' for none)")
    ap.add_argument("--only", default="steady,low,release,neighbour",
                    help="which parts to run (comma-separated)")
    ap.add_argument("--in-this-netns", action="store_true",
                    help="do not move into a private network namespace")
    a = ap.parse_args(argv)
    if not a.in_this_netns:
        enter_private_netns()
    only = set(a.only.split(","))
    limits = [int(x) for x in a.limits.split(",") if x]
    lows = [int(x) for x in a.low_limits.split(",") if x]
    results: list[Result] = []
    rows: list[dict] = []

    def keep(r: Result) -> None:
        results.append(r)
        rows.append(r.row())
        if a.json:
            report.emit_json(r.row())

    with tempfile.TemporaryDirectory(prefix="chadthrottle-bench-") as tmp:
        progress = Path(tmp) / "progress"
        with HttpServer(progress=progress) as srv:
            if "steady" in only:
                for limit in limits:
                    cases = [lambda e, lim=limit: run_curl_download(e, srv, lim, a.seconds),
                             lambda e, lim=limit: run_curl_upload(e, srv, progress, lim,
                                                                  a.seconds),
                             lambda e, lim=limit: run_iperf3(e, lim, a.seconds, True),
                             lambda e, lim=limit: run_iperf3(e, lim, a.seconds, False)]
                    for case in cases:
                        with Engine() as eng:
                            keep(case(eng))
            if "low" in only:
                for limit in lows:
                    with Engine() as eng:
                        keep(run_curl_download(eng, srv, limit, a.low_seconds, case="low"))
                    with Engine() as eng:
                        keep(run_curl_upload(eng, srv, progress, limit, a.low_seconds,
                                             case="low"))
            if "release" in only:
                for limit in (50 * KiB, 1 * MiB):
                    for how in ("clear", "raise"):
                        with Engine() as eng:
                            keep(run_release(eng, srv, limit, how))
            neighbour = run_neighbour(srv, min(a.seconds, 5.0)) if "neighbour" in only else None
    if a.json:
        if neighbour:
            report.emit_json(neighbour)
    else:
        steady = [r for r in results if r.case in ("steady", "low")]
        if steady:
            report.table(
                "accuracy (loopback, private namespace; steady = seconds 2..end; bins = share "
                "of 0.25 s bins after the first second within ±25 %)",
                ["case", "direction", "client", "limit", "achieved", "ratio", "first s", "bins",
                 "retransmits"],
                [(r.case, r.direction, r.client, report.human_rate(r.limit),
                  report.human_rate(r.achieved), f"{r.achieved / r.limit:.3f}",
                  f"{r.first / r.limit:.2f}", f"{r.bins_ok * 100:.0f} %", r.retrans)
                 for r in steady])
        rel = [r for r in results if r.case.startswith("release")]
        if rel:
            report.table("release: a limited download's rate 0.5..1.5 s after its limit is "
                         "cleared or raised 20×",
                         ["case", "old limit", "rate after", "× old limit", "retransmits"],
                         [(r.case, report.human_rate(r.limit),
                           report.human_rate(r.extra["after_bps"]),
                           f"{r.extra['after_ratio']:.1f}", r.retrans) for r in rel])
        if neighbour:
            print(f"neighbour (unlimited curl beside a 1 MiB/s-limited one, same cgroup): "
                  f"{report.human_rate(neighbour['beside_limited_bps'])} vs "
                  f"{report.human_rate(neighbour['alone_bps'])} alone, ratio "
                  f"{neighbour['ratio']:.3f}")
    if a.plot:
        for p in plot(results, Path(a.plot)):
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(os.sys.argv[1:]))
