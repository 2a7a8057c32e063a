"""Control-plane benchmark: ``python -m chadthrottle.bench control [--json]``.

Starts a private bus and the real daemon (or uses ``--address`` of a running one), then
measures over the bus, from a dbus-fast client:

* SetLimit -> reply round trip, p50/p99 of 1,000 calls (alternating two rates on one idle
  process, so every call is a real change of a held limit), then 200 more spaced 20 ms
  apart as the held measurement spaces them (what waking up costs, measured alongside);
* scale: 10,000 idle processes limited at once — time to set them all, ListLimits and
  ListProcesses time (median of 5), the SetLimit round trip again while they are held
  (for >= 10 s, so the daemon's periodic sampling and diagnostics compete), the daemon's
  RSS before and with the limits (and per limit), and the daemon's CPU while it holds them
  and nobody calls (utime + stime over IDLE_CPU_SECONDS, in % of one core).

Targets: SetLimit p99 <= 2 ms idle and <= 5 ms with 10,000 limits held, ListLimits of
10,000 <= 25 ms, RSS <= 30 MB idle and <= 50 MB with 10,000 limits, CPU <= 2 % of one core.
Every process started here is killed by its pid; the bus and daemon are stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import names

#: the held measurement: calls this far apart (the daemon's periodic work gets its turns),
#: for 10 s and at least this many
HELD_SPACING = 0.02
HELD_MIN_CALLS = 200
TARGETS = {"setlimit_p99_idle_ms": 2.0, "setlimit_p99_held_ms": 5.0, "listlimits_ms": 25.0,
           "rss_idle_mb": 30.0, "rss_with_limits_mb": 50.0, "cpu_idle_limits_pct": 2.0}
IDLE_CPU_SECONDS = 20.0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _spawn_sleepers(n: int) -> list[int]:
    pids = []
    try:
        for _ in range(n):
            pids.append(os.posix_spawn("/bin/sleep", ["sleep", "3600"], os.environ))
    except BaseException:
        _kill(pids)
        raise
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


async def _measure(address: str, daemon_pid: int | None, calls: int, nlimits: int,
                   log=print) -> dict:
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    bus = await MessageBus(bus_address=address).connect()

    async def call(member: str, sig: str = "", body: list | None = None) -> Message:
        reply = await bus.call(Message(destination=names.BUS_NAME, path=names.OBJECT_PATH,
                                       interface=names.INTERFACE, member=member,
                                       signature=sig, body=body or []))
        if reply.message_type is not MessageType.METHOD_RETURN:
            raise RuntimeError(f"{member}: {reply.error_name} {reply.body}")
        return reply

    out: dict = {}
    target = _spawn_sleepers(1)
    sleepers: list[int] = []
    try:
        rss_idle = _rss_mb(daemon_pid) if daemon_pid else None
        rates = (1 << 20, 2 << 20)
        for i in range(20):  # warm-up (first call attaches the programs)
            await call("SetLimit", "utt", [target[0], rates[i % 2], 0])
        rtts = []
        for i in range(calls):
            t0 = time.perf_counter_ns()
            await call("SetLimit", "utt", [target[0], rates[i % 2], 0])
            rtts.append((time.perf_counter_ns() - t0) / 1e6)
        # the same calls spaced as the held measurement below spaces them (20 ms apart): what
        # waking up costs, side by side with what holding 10,000 limits costs
        spaced = []
        for i in range(HELD_MIN_CALLS):
            t0 = time.perf_counter_ns()
            await call("SetLimit", "utt", [target[0], rates[i % 2], 0])
            spaced.append((time.perf_counter_ns() - t0) / 1e6)
            await asyncio.sleep(HELD_SPACING)
        await call("ClearLimit", "u", [target[0]])
        out["setlimit_rtt_ms"] = {
            "calls": calls, "p50": round(_percentile(rtts, 50), 3),
            "p99": round(_percentile(rtts, 99), 3), "max": round(max(rtts), 3),
        }
        out["setlimit_rtt_ms_spaced"] = {
            "calls": len(spaced), "p50": round(_percentile(spaced, 50), 3),
            "p99": round(_percentile(spaced, 99), 3), "max": round(max(spaced), 3),
        }
        log(f"SetLimit round trip: p50 {out['setlimit_rtt_ms']['p50']} ms, "
            f"p99 {out['setlimit_rtt_ms']['p99']} ms")

        log(f"starting {nlimits} idle processes…")
        sleepers = _spawn_sleepers(nlimits)
        t0 = time.perf_counter()
        for pid in sleepers:
            await call("SetLimit", "utt", [pid, 51200, 51200])
        set_all = time.perf_counter() - t0
        log(f"{nlimits} limits set in {set_all:.1f} s")
        ll, lp = [], []
        n_listed = 0
        for _ in range(5):
            t0 = time.perf_counter()
            r = await call("ListLimits")
            ll.append((time.perf_counter() - t0) * 1e3)
            n_listed = len(r.body[0])
            t0 = time.perf_counter()
            await call("ListProcesses")
            lp.append((time.perf_counter() - t0) * 1e3)
        out["scale"] = {
            "limits_held": n_listed,
            "set_all_s": round(set_all, 2),
            "setlimit_per_s": round(nlimits / set_all, 1),
            "listlimits_ms": {"median": round(statistics.median(ll), 2),
                              "max": round(max(ll), 2)},
            "listprocesses_ms": {"median": round(statistics.median(lp), 2),
                                 "max": round(max(lp), 2)},
        }
        # the round trip again while every limit is held (periodic sampling competes)
        rtts2 = []
        t_end = time.monotonic() + 10
        while len(rtts2) < HELD_MIN_CALLS or time.monotonic() < t_end:
            t0 = time.perf_counter_ns()
            await call("SetLimit", "utt", [sleepers[len(rtts2) % len(sleepers)],
                                           rates[len(rtts2) % 2], 0])
            rtts2.append((time.perf_counter_ns() - t0) / 1e6)
            await asyncio.sleep(HELD_SPACING)
        out["scale"]["setlimit_rtt_ms_held"] = {
            "calls": len(rtts2), "p50": round(_percentile(rtts2, 50), 3),
            "p99": round(_percentile(rtts2, 99), 3), "max": round(max(rtts2), 3)}
        if daemon_pid:
            rss_held = _rss_mb(daemon_pid)
            out["rss_mb"] = {"idle": round(rss_idle, 1), "with_limits": round(rss_held, 1),
                             "per_limit_kb": round((rss_held - rss_idle) * 1024 / nlimits, 2)}
            log(f"holding {n_listed} limits, nobody calling: CPU over {IDLE_CPU_SECONDS:.0f} s…")
            c0, t0 = _cpu_seconds(daemon_pid), time.monotonic()
            await asyncio.sleep(IDLE_CPU_SECONDS)
            cpu = (_cpu_seconds(daemon_pid) - c0) / (time.monotonic() - t0) * 100
            out["cpu_idle_limits_pct"] = round(cpu, 2)
        log(f"ListLimits({n_listed}) {out['scale']['listlimits_ms']['median']} ms, "
            f"ListProcesses {out['scale']['listprocesses_ms']['median']} ms")
    finally:
        _kill(target + sleepers)
        bus.disconnect()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["control"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="python -m chadthrottle.bench control",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--limits", type=int, default=10_000)
    p.add_argument("--address", help="bus of an already running daemon (default: start one)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench control: needs root (it starts the daemon)", file=sys.stderr)
        return 1

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    from ..server.devrun import PrivateBus

    bus = daemon = None
    workdir = statedir = None
    try:
        if args.address:
            address, daemon_pid = args.address, None
        else:
            workdir = tempfile.mkdtemp(prefix="chadthrottle-bench-")
            os.chmod(workdir, 0o755)
            bus = PrivateBus(workdir)
            address = bus.start()
            # the state dir on a tmpfs, as /run is on a systemd machine (one file per limit)
            statedir = tempfile.mkdtemp(prefix="chadthrottle-bench-state-", dir=_tmpfs())
            env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address,
                       CHADTHROTTLE_STATE_DIR=statedir,
                       CHADTHROTTLE_CONFIG_DIR=os.path.join(workdir, "etc"))
            src = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = src + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            daemon = subprocess.Popen(
                [sys.executable, "-m", "chadthrottle.server.main", "--log-target=stderr",
                 "--log-level=warning"], env=env, stdin=subprocess.DEVNULL)
            daemon_pid = daemon.pid
            _wait_for_name(address, daemon)
        result = asyncio.run(_measure(address, daemon_pid, args.calls, args.limits, log))
        if daemon is not None:
            t0 = time.perf_counter()
            daemon.send_signal(signal.SIGTERM)
            rc = daemon.wait(60)
            result["shutdown"] = {"seconds": round(time.perf_counter() - t0, 2), "exit": rc}
        rss = result.get("rss_mb", {})
        measured = {
            "setlimit_p99_idle_ms": result["setlimit_rtt_ms"]["p99"],
            "setlimit_p99_held_ms": result["scale"]["setlimit_rtt_ms_held"]["p99"],
            "listlimits_ms": result["scale"]["listlimits_ms"]["median"],
            "rss_idle_mb": rss.get("idle"), "rss_with_limits_mb": rss.get("with_limits"),
            "cpu_idle_limits_pct": result.get("cpu_idle_limits_pct")}
        result["targets"] = {k: {"target": t, "measured": measured[k],
                                 "met": measured[k] is not None and measured[k] <= t}
                             for k, t in TARGETS.items()}
        result["meets_targets"] = all(v["met"] for v in result["targets"].values())
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            from . import report

            sc = result["scale"]
            report.table(
                f"control plane: a real daemon on a private bus, {sc['limits_held']:,} limits",
                ["case", "figure", "target", "met"],
                [(k.replace("_", " "), v["measured"], f"<= {v['target']}",
                  "yes" if v["met"] else "NO") for k, v in result["targets"].items()]
                + [("setlimit p50 idle ms", result["setlimit_rtt_ms"]["p50"], "", ""),
                   ("setlimit p50 · p99 idle, 20 ms apart",
                    f"{result['setlimit_rtt_ms_spaced']['p50']} · "
                    f"{result['setlimit_rtt_ms_spaced']['p99']}", "", ""),
                   ("setlimit p50 held ms", sc["setlimit_rtt_ms_held"]["p50"], "", ""),
                   ("listprocesses ms", sc["listprocesses_ms"]["median"], "", ""),
                   ("setlimit per s (10,000 in a row)", sc["setlimit_per_s"], "", ""),
                   ("rss per limit KB", result.get("rss_mb", {}).get("per_limit_kb"), "", ""),
                   ("shutdown s", result.get("shutdown", {}).get("seconds"), "", "")])
        return 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if bus is not None:
            bus.stop()
        for d in (statedir, workdir):
            if d:
                shutil.rmtree(d, ignore_errors=True)


def _tmpfs() -> str | None:
    """A tmpfs directory for the daemon's state (/run where it is one, else /dev/shm)."""
    for d in ("/run", "/dev/shm"):
        with open("/proc/self/mountinfo") as f:
            if any(line.split()[4] == d and " - tmpfs " in line for line in f):
                return d
    return None


def _wait_for_name(address: str, daemon: subprocess.Popen, timeout: float = 20) -> None:
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.returncode}")
        r = subprocess.run(["dbus-send", "--system", "--print-reply",
                            "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                            "org.freedesktop.DBus.NameHasOwner", f"string:{names.BUS_NAME}"],
                           env=env, capture_output=True, text=True)
        if "boolean true" in r.stdout:
            return
        time.sleep(0.05)
    raise RuntimeError("daemon did not own its name")


if __name__ == "__main__":
    sys.exit(main())
