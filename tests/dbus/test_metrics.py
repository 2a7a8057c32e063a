"""The metrics endpoint of the real daemon, scraped by real HTTP clients during real limited
transfers and parsed with the client library's own parsers (issue 11, item 2).

One daemon on the private bus, with its settings file and a rule file in a config dir of
its own: a curl limited with SetLimit, a self-paced downloader limited by a ``cmdline``
rule, and one more downloader without any limit.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

import chadthrottle
from chadthrottle import abi, cgroups, names, procfs
from chadthrottle.bench.traffic import (
    HttpServer,
    Transfer,
    curl_download,
    free_port,
    paced_download,
)
from chadthrottle.kernel import MAPS
from conftest import env_with, start_daemon

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the daemon loads BPF)"),
]

MiB = 1 << 20
LIMIT = 1 * MiB  # SetLimit on curl
RULE_RATE = 2 * MiB  # the rule's download limit; its process asks for twice as much
RULE_ID = "metrics-rule"
RULED_BYTES = 777_777_777  # the URL the rule recognises the process by
FREE_BYTES = 555_555_555
SECONDS = 12
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def series(families) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of parsed families."""
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def pick(data: dict, name: str, **labels: str) -> dict[frozenset, float]:
    """The samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return {lab: v for (n, lab), v in data.items() if n == name and want <= lab}


def one(data: dict, name: str, **labels: str) -> float:
    found = pick(data, name, **labels)
    assert len(found) == 1, f"{name}{labels}: {found}"
    return next(iter(found.values()))


def scrape(url: str, accept: str | None = None) -> tuple[str, str]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=15) as resp:
        return resp.headers["Content-Type"], resp.read().decode()


def unit_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return cgroups.unit_of(cgroups.norm(line[3:]))
    return ""


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    config, state = tmp_path / "etc", tmp_path / "run"
    (config / "rules.d").mkdir(parents=True)
    state.mkdir()
    return config, state


def test_scrape_during_limited_transfers(system_bus, tmp_path, dirs) -> None:
    config, state = dirs
    port = free_port()
    (config / "chadthrottled.toml").write_text(
        f'log_level = "info"\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    (config / "rules.d" / f"{RULE_ID}.toml").write_text(
        f"name = \"metrics test\"\ncmdline = 'traffic fetch \\S+/bytes/{RULED_BYTES} '\n"
        f"download = {RULE_RATE}\n")
    d = start_daemon(system_bus, tmp_path / "daemon.log",
                     env=env_with(system_bus, CHADTHROTTLE_CONFIG_DIR=str(config),
                                  CHADTHROTTLE_STATE_DIR=str(state)))
    url = f"http://127.0.0.1:{port}/metrics"
    t0 = time.monotonic()
    try:
        with HttpServer() as srv, \
                Transfer(curl_download(srv.url(1 << 34), SECONDS), max_seconds=SECONDS,
                         start_paused=True) as limited, \
                Transfer(paced_download(srv.url(RULED_BYTES), 2 * RULE_RATE, SECONDS),
                         max_seconds=SECONDS) as ruled, \
                Transfer(paced_download(srv.url(FREE_BYTES), MiB, SECONDS),
                         max_seconds=SECONDS) as free:
            r = d.call("SetLimit", f"uint32:{limited.pid}", f"uint64:{LIMIT}", "uint64:0")
            assert r.ok, r
            limited.release()
            time.sleep(6)  # past the first seconds: rates over a full window
            free_before = free.total
            ctype, body = scrape(url, OPENMETRICS)
            since = time.monotonic() - limited.t0
            curl_rate = limited.rate(since - 2, since)  # as curl saw it, over the same window
            time.sleep(2)
            ctype_text, body_text = scrape(url)
            limited_total = limited.total
            ruled_comm = procfs.comm(ruled.pid)
            limited_unit = unit_of(limited.pid)
        # every transfer has ended (stopped by pid): their limits end, the rule's totals stay
        deadline = time.monotonic() + 10
        while True:
            time.sleep(1.1)  # a scrape within a second would share the previous snapshot
            after = series(parse_text(scrape(url)[1]))
            if not pick(after, names.METRIC_LIMIT_BYTES) or time.monotonic() > deadline:
                break
    finally:
        rc = d.stop()
    assert rc == 0, d.log()[-3000:]
    assert "settings: log_level=info [file]" in d.log()
    if os.environ.get("CHADTHROTTLE_SCRAPE_OUT"):  # the README's sample comes from here
        Path(os.environ["CHADTHROTTLE_SCRAPE_OUT"]).write_text(body)
    print(f"\nscraped {len(body)} bytes of OpenMetrics; test took "
          f"{time.monotonic() - t0:.1f} s")

    # ---- formats: negotiated, and parsed by the client library's own parsers
    assert ctype.startswith("application/openmetrics-text") and body.endswith("# EOF\n")
    assert ctype_text.startswith("text/plain") and "# EOF" not in body_text
    om = series(parse_om(body))
    text = series(parse_text(body_text))
    assert {n for n, _ in om} == {n for n, _ in text}  # the same series in both formats

    # ---- the limit set with SetLimit: its labels, the exact limit, a plausible rate
    lim = dict(pid=str(limited.pid), comm="curl", rule="", unit=limited_unit)
    dl = dict(lim, direction="download")
    assert one(om, names.METRIC_LIMIT_MAX, **dl) == LIMIT
    rate = one(om, names.METRIC_LIMIT_RATE, **dl)
    assert 0.5 * LIMIT <= rate <= 1.5 * LIMIT, (rate, curl_rate)
    got = one(om, names.METRIC_LIMIT_BYTES, **dl)
    assert 0 < got <= limited_total + 2 * MiB  # counted by the program, before curl read it
    assert one(om, names.METRIC_LIMIT_PACKETS, **dl) > 0
    assert one(om, names.METRIC_LIMIT_DROPPED_PACKETS, **dl) >= 0
    status = pick(om, names.METRIC_LIMIT_STATUS, **dl)
    assert [dict(k)["status"] for k in status] == [names.STATUS_THROTTLED], status
    assert list(status.values()) == [1.0]
    assert one(om, names.METRIC_LIMIT_PROCESSES, **lim) == 1
    up = dict(lim, direction="upload")  # not limited: counters, but no limit and no verdict
    assert one(om, names.METRIC_LIMIT_BYTES, **up) >= 0
    assert not pick(om, names.METRIC_LIMIT_MAX, **up)
    assert not pick(om, names.METRIC_LIMIT_STATUS, **up)
    # counters only grow: the later text scrape has at least as much
    assert one(text, names.METRIC_LIMIT_BYTES, **dl) >= got

    # ---- the rule and the limit it made
    rl = dict(pid=str(ruled.pid), rule=RULE_ID, direction="download")
    assert pick(om, names.METRIC_LIMIT_MAX, **rl) and one(om, names.METRIC_LIMIT_MAX, **rl) \
        == RULE_RATE
    assert one(om, names.METRIC_LIMIT_BYTES, **rl) > 0
    assert dict(next(iter(pick(om, names.METRIC_LIMIT_BYTES, **rl))))["comm"] == ruled_comm
    rule = dict(rule=RULE_ID, direction="download")
    assert one(om, names.METRIC_RULE_MAX, **rule) == RULE_RATE
    rule_rate = one(om, names.METRIC_RULE_RATE, **rule)
    assert 0.5 * RULE_RATE <= rule_rate <= 1.5 * RULE_RATE, rule_rate
    assert one(om, names.METRIC_RULE_BYTES, **rule) >= one(om, names.METRIC_LIMIT_BYTES, **rl)
    assert one(om, names.METRIC_RULE_PROCESSES, rule=RULE_ID) == 1
    counts = {dict(k)["status"]: v for k, v in pick(om, names.METRIC_RULE_LIMITS, **rule).items()}
    assert sum(counts.values()) == 1 and set(counts) == {
        names.STATUS_THROTTLED, names.STATUS_NOT_WORKING, names.STATUS_NOT_DROPPING,
        names.STATUS_PROGRAM_NOT_CALLED}
    assert one(om, names.METRIC_RULE_INFO, rule=RULE_ID, scope="process",
               permanent="true", enabled="true") == 1

    # after the processes ended: no limit series, the rule's counters kept what it held
    assert not pick(after, names.METRIC_LIMIT_BYTES)
    assert one(after, names.METRIC_RULE_PROCESSES, rule=RULE_ID) == 0
    assert one(after, names.METRIC_RULE_BYTES, **rule) >= one(text, names.METRIC_RULE_BYTES,
                                                               **rule) > 0
    assert one(after, names.METRIC_BUDGETS, origin="explicit") == 0

    # ---- unlimited processes: no series of their own, summed instead
    pids = {dict(lab).get("pid") for (_, lab) in om} - {None}
    assert pids == {str(limited.pid), str(ruled.pid)}, pids
    assert one(om, names.METRIC_UNLIMITED_BYTES, direction="download") >= free_before > 0
    assert one(om, names.METRIC_UNLIMITED_PROCESSES) >= 1

    # ---- the daemon: map fill for every map, budgets, bus calls, the sampler
    max_entries = {dict(k)["map"]: v for k, v in pick(om, names.METRIC_MAP_MAX_ENTRIES).items()}
    assert set(max_entries) == set(MAPS)
    assert max_entries[names.MAP_LIMITS] == abi.MAX_LIMITS
    assert max_entries[names.MAP_PROC_TRAFFIC] == abi.MAX_TRAFFIC
    entries = {dict(k)["map"]: v for k, v in pick(om, names.METRIC_MAP_ENTRIES).items()}
    assert entries[names.MAP_LIMITS] == entries[names.MAP_LIMIT_CFG] == 2
    assert entries[names.MAP_PROC_TRAFFIC] >= 3  # the three downloaders at least
    assert entries[names.MAP_RULES] == 1  # one rule slot in use
    assert all(0 <= entries[m] <= max_entries[m] for m in entries)
    assert one(om, names.METRIC_BUDGETS, origin="explicit") == 1
    assert one(om, names.METRIC_BUDGETS, origin="rule") == 1
    assert one(om, names.METRIC_ATTACHED_CGROUPS) >= 1
    assert one(om, "chadthrottle_bus_calls_total", member="SetLimit") == 1
    assert one(om, names.METRIC_SAMPLES) > 0 and one(om, names.METRIC_SAMPLING) == 1
    assert 0 < one(om, names.METRIC_SAMPLE_DURATION) < 1
    assert 0 < one(om, names.METRIC_SNAPSHOT_DURATION) < 1
    assert one(om, names.METRIC_BUILD_INFO, version=chadthrottle.__version__) == 1
    assert one(om, "chadthrottle_bpf_dropped_packets_total", direction="download") >= 0
    assert one(om, "process_resident_memory_bytes") > 0


@pytest.fixture
def unit_cgroup():
    """A cgroup of our own below the cgroup2 mount; removed at the end (its processes have
    ended by then: the transfers inside are stopped by pid first)."""
    path = cgroups.cgroup2_mount() / f"chadthrottle-metrics-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(100):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # a process still leaving
                time.sleep(0.1)


def test_unit_limit_series(system_bus, tmp_path, dirs, unit_cgroup) -> None:
    config, state = dirs
    port = free_port()
    unit = "/" + unit_cgroup.name
    d = start_daemon(system_bus, tmp_path / "daemon.log", f"--metrics-listen=127.0.0.1:{port}",
                     env=env_with(system_bus, CHADTHROTTLE_CONFIG_DIR=str(config),
                                  CHADTHROTTLE_STATE_DIR=str(state)))
    try:
        with HttpServer() as srv, \
                Transfer(paced_download(srv.url(FREE_BYTES), 2 * LIMIT, SECONDS),
                         max_seconds=SECONDS, start_paused=True) as inside:
            # in the cgroup before its first socket: a socket keeps the cgroup it was made in
            (unit_cgroup / "cgroup.procs").write_text(str(inside.pid))
            r = d.call("SetUnitLimit", f"string:{unit}", f"uint64:{LIMIT}", "uint64:0")
            assert r.ok, r
            inside.release()
            time.sleep(6)
            _, body = scrape(f"http://127.0.0.1:{port}/metrics", OPENMETRICS)
            inside.stop()
        assert d.call("ClearUnitLimit", f"string:{unit}").ok
    finally:
        rc = d.stop()
    assert rc == 0, d.log()[-3000:]
    om = series(parse_om(body))
    dl = dict(unit=unit, direction="download")
    assert one(om, names.METRIC_UNIT_MAX, **dl) == LIMIT
    rate = one(om, names.METRIC_UNIT_RATE, **dl)
    assert 0.5 * LIMIT <= rate <= 1.5 * LIMIT, rate
    assert one(om, names.METRIC_UNIT_BYTES, **dl) > 0
    [status] = pick(om, names.METRIC_UNIT_STATUS, **dl)
    assert dict(status)["status"] == names.STATUS_THROTTLED
    assert not pick(om, names.METRIC_UNIT_MAX, unit=unit, direction="upload")
    assert not pick(om, names.METRIC_LIMIT_BYTES)  # no process limit: no per-pid series


def test_unix_socket_reload_notice_and_cleanup(system_bus, tmp_path, dirs) -> None:
    config, state = dirs
    sock = tmp_path / "metrics" / "metrics.sock"  # its directory is made
    settings = config / "chadthrottled.toml"
    settings.write_text("monitor_all = false\n")
    d = start_daemon(system_bus, tmp_path / "daemon.log", f"--metrics-listen=unix:{sock}",
                     env=env_with(system_bus, CHADTHROTTLE_CONFIG_DIR=str(config),
                                  CHADTHROTTLE_STATE_DIR=str(state)))
    try:
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o666
        curl = subprocess.run(["curl", "-sS", "--max-time", "15", "--unix-socket", str(sock),
                               "http://localhost/metrics"], capture_output=True, text=True,
                              timeout=20)
        assert curl.returncode == 0, curl.stderr
        data = series(parse_text(curl.stdout))
        assert one(data, names.METRIC_BUDGETS, origin="explicit") == 0
        assert pick(data, names.METRIC_MAP_MAX_ENTRIES, map=names.MAP_LIMITS)
        assert not pick(data, names.METRIC_LIMIT_BYTES)
        # settings are read at start; a reload says when the file changed
        settings.write_text("monitor_all = true\n")
        os.kill(d.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "take effect when the daemon restarts" not in d.log():
            assert time.monotonic() < deadline, d.log()[-2000:]
            time.sleep(0.1)
        assert d.alive()
    finally:
        rc = d.stop()
    assert rc == 0, d.log()[-3000:]
    assert not sock.exists()  # removed on stop


def test_a_port_in_use_stops_the_start(system_bus, tmp_path, dirs) -> None:
    config, state = dirs
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError) as info:
            start_daemon(system_bus, tmp_path / "daemon.log",
                         f"--metrics-listen=127.0.0.1:{port}",
                         env=env_with(system_bus, CHADTHROTTLE_CONFIG_DIR=str(config),
                                      CHADTHROTTLE_STATE_DIR=str(state)))
    log = (tmp_path / "daemon.log").read_text()
    assert "rc=1" in str(info.value)
    assert f"cannot serve metrics on 127.0.0.1:{port}" in log and "in use" in log
    assert "detached; bye" in log  # the BPF object it had loaded is gone again


def test_a_broken_settings_file_stops_the_start(system_bus, tmp_path, dirs) -> None:
    config, state = dirs
    (config / "chadthrottled.toml").write_text('[metrics]\nlisten = "127.0.0.1"\n')
    with pytest.raises(RuntimeError) as info:
        start_daemon(system_bus, tmp_path / "daemon.log",
                     env=env_with(system_bus, CHADTHROTTLE_CONFIG_DIR=str(config),
                                  CHADTHROTTLE_STATE_DIR=str(state)))
    assert "rc=6" in str(info.value)
    log = (tmp_path / "daemon.log").read_text()
    assert f"cannot start: {config / 'chadthrottled.toml'}: key 'metrics.listen'" in log
