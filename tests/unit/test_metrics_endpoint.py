"""The metrics endpoint without a daemon (issue 11): a snapshot as families (names, labels,
what is left out), the crossing between threads, and the HTTP server on a real socket with
a real client.  The daemon itself is scraped by tests/dbus/test_metrics.py."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.openmetrics.exposition import generate_latest as generate_om
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from chadthrottle import abi, names
from chadthrottle.config import ListenAddress
from chadthrottle.errors import MetricsUnavailable
from chadthrottle.metrics.collector import SnapshotCollector, families
from chadthrottle.metrics.gather import counters_of, label
from chadthrottle.metrics.http import MetricsServer
from chadthrottle.metrics.snapshot import (
    Counters,
    Direction,
    LimitRow,
    MapFill,
    RuleDirection,
    RuleRow,
    Snapshot,
    UnitRow,
    Unlimited,
)
from chadthrottle.metrics.source import SnapshotSource

EVIL = label('x\x1b]2;pwn\x07"\\\n')


def sample_snapshot(taken: float = 0.0) -> Snapshot:
    dn = Direction(Counters(5_000_000, 80, 3, 190_000), 1_040_000.0, 1_048_576,
                   names.STATUS_THROTTLED)
    up = Direction(Counters(900, 80, 0, 0), 12.5, 0, names.STATUS_UNLIMITED)
    return Snapshot(
        taken=taken, version="9.9",
        limits=(LimitRow(4242, "curl", "", "session-2.scope", 1, (dn, up)),
                LimitRow(4343, EVIL, "steam", "", 3, (dn, up))),
        units=(UnitRow("/system.slice/backup.service", (up, dn)),),
        rules=(RuleRow("steam", "application", True, False, 3, (
            RuleDirection(Counters(7, 1, 0, 0), 5.0, 5_000_000,
                          ((names.STATUS_THROTTLED, 1), (names.STATUS_NOT_WORKING, 0))),
            RuleDirection(Counters(), 0.0, 0, ()))),),
        unlimited=Unlimited(4, (123, 456), (7, 8)),
        maps=(MapFill("limits", "hash", 2, 16384), MapFill("events", "ringbuf", None, 262144)),
        attached_cgroups=2, budgets=(("explicit", 1), ("rule", 1)), subscribers=1,
        sampling=True, samples=17, sample_seconds=0.0004,
        bus_calls=(("GetStats", 3), ("SetLimit", 1)),
        kernel=(("untagged", "download", 10), ("untagged", "upload", 11), ("full", "", 0),
                ("brand_new", "", 5)),
        build_seconds=0.002)


def render(snap: Snapshot, openmetrics: bool = True) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(lambda: snap))
    return (generate_om if openmetrics else generate_latest)(reg).decode()


def by_name(text: str, openmetrics: bool = True) -> dict[str, list]:
    parse = parse_om if openmetrics else parse_text
    out: dict[str, list] = {}
    for f in parse(text):
        for s in f.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_both_formats_parse_with_the_libraries_parsers() -> None:
    snap = sample_snapshot()
    om, text = by_name(render(snap)), by_name(render(snap, False), False)
    assert set(om) == set(text)
    for fam in families(snap):
        assert fam.name.startswith("chadthrottle_"), fam.name
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), fam.name
        if fam.unit:
            assert fam.name.endswith("_" + fam.unit), fam.name


def test_limits_units_and_rules_with_their_labels() -> None:
    s = by_name(render(sample_snapshot()))
    dl = {"pid": "4242", "comm": "curl", "rule": "", "unit": "session-2.scope",
          "direction": "download"}
    [limit] = [x for x in s[names.METRIC_LIMIT_MAX] if x.labels["pid"] == "4242"]
    assert limit.labels == dl and limit.value == 1_048_576
    assert {x.labels["direction"] for x in s[names.METRIC_LIMIT_BYTES]} == {"download",
                                                                           "upload"}
    # an unlimited direction has counters but no limit and no verdict
    assert {x.labels["direction"] for x in s[names.METRIC_LIMIT_STATUS]} == {"download"}
    [st] = [x for x in s[names.METRIC_LIMIT_STATUS] if x.labels["pid"] == "4242"]
    assert st.labels["status"] == "throttled" and st.value == 1
    [unit] = s[names.METRIC_UNIT_MAX]
    assert unit.labels == {"unit": "/system.slice/backup.service", "direction": "upload"}
    rl = {(x.labels["status"], x.value) for x in s[names.METRIC_RULE_LIMITS]}
    assert rl == {("throttled", 1), ("not-working", 0)}
    [info] = s[names.METRIC_RULE_INFO]
    assert info.labels == {"rule": "steam", "scope": "application", "enabled": "true",
                           "permanent": "false"}
    assert {x.labels["direction"]: x.value for x in s[names.METRIC_UNLIMITED_BYTES]} == {
        "download": 123, "upload": 456}
    assert s[names.METRIC_UNLIMITED_PROCESSES][0].value == 4


def test_daemon_gauges_map_fill_and_kernel_counters() -> None:
    s = by_name(render(sample_snapshot()))
    assert {x.labels["map"] for x in s[names.METRIC_MAP_MAX_ENTRIES]} == {"limits", "events"}
    assert [x.labels["map"] for x in s[names.METRIC_MAP_ENTRIES]] == ["limits"]  # not events
    assert {x.labels["member"]: x.value for x in s[names.METRIC_BUS_CALLS]} == {
        "GetStats": 3, "SetLimit": 1}
    assert {x.labels["direction"] for x in s["chadthrottle_bpf_untagged_packets_total"]} == {
        "download", "upload"}
    assert s["chadthrottle_bpf_map_full_total"][0].value == 0
    assert s["chadthrottle_bpf_brand_new_total"][0].value == 5  # a new kernel counter shows
    assert {x.labels["origin"]: x.value for x in s[names.METRIC_BUDGETS]} == {
        "explicit": 1, "rule": 1}
    assert s[names.METRIC_BUILD_INFO][0].labels == {"version": "9.9"}


def test_names_chosen_by_others_cannot_break_the_exposition() -> None:
    assert EVIL == 'x\\x1b]2;pwn\\x07"\\\\x0a'
    text = render(sample_snapshot())
    assert "\x1b" not in text and "\x07" not in text
    comms = {x.labels["comm"] for x in by_name(text)[names.METRIC_LIMIT_BYTES]}
    assert comms == {"curl", EVIL}  # escaped in the exposition, the same after parsing
    assert label("\udcff") == "\\udcff"  # undecodable bytes cannot make the output fail


def test_counters_are_read_from_the_abi_layout() -> None:
    v = abi.Limit()
    for d in range(abi.DIRS):
        b = v.dir[d]
        b.passed_bytes, b.passed_packets = 1000 + d, 10 + d
        b.dropped_bytes, b.dropped_packets, b.calls = 500 + d, 5 + d, 99
    assert counters_of(v) == (Counters(1000, 10, 5, 500), Counters(1001, 11, 6, 501))


def test_describe_gives_names_for_name_filters() -> None:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(sample_snapshot))
    restricted = generate_latest(reg.restricted_registry([names.METRIC_LIMIT_MAX])).decode()
    assert names.METRIC_LIMIT_MAX in restricted and names.METRIC_LIMIT_BYTES not in restricted


# --- the crossing between threads ---------------------------------------------------------------
class LoopThread:
    """An asyncio loop running on a thread of its own, like the daemon's."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, fn):
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def loop_thread():
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()


def test_snapshots_are_built_on_the_loops_thread_only(loop_thread) -> None:
    built_on: list[int] = []

    def build() -> Snapshot:
        built_on.append(threading.get_ident())
        return sample_snapshot(time.monotonic())

    source = loop_thread.call(lambda: SnapshotSource(loop_thread.loop, build, max_age=60))
    first = source.get()  # from this (the test's) thread
    assert source.get() is first  # young enough: no second build
    assert built_on == [loop_thread.thread.ident]


def test_a_loop_that_does_not_answer_is_a_503(tmp_path: Path) -> None:
    stuck = asyncio.new_event_loop()  # never runs: nothing scheduled on it is ever done
    try:
        source = SnapshotSource(stuck, sample_snapshot, timeout=0.3)
        with pytest.raises(MetricsUnavailable):
            threading_result(source.get)
        server = serve(ListenAddress("127.0.0.1", 0), source)
        try:
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
            assert info.value.code == 503
            assert b"did not answer within 0.3 s" in info.value.read()
        finally:
            server.close()
    finally:
        stuck.close()


def threading_result(fn):
    """fn() on another thread (get() on the loop's own thread would build at once)."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except Exception as e:  # noqa: BLE001 - handed back
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    if "error" in out:
        raise out["error"]
    return out["value"]


def serve(address: ListenAddress, source: SnapshotSource) -> MetricsServer:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(SnapshotCollector(source.get))
    server = MetricsServer(address, make_wsgi_app(reg))
    server.start()
    return server


# --- the HTTP server ------------------------------------------------------------------------------
def test_tcp_v4_and_v6_with_a_real_client(loop_thread) -> None:
    source = loop_thread.call(lambda: SnapshotSource(
        loop_thread.loop, lambda: sample_snapshot(time.monotonic())))
    for host, url in (("127.0.0.1", "http://127.0.0.1:{}/metrics"),
                      ("::1", "http://[::1]:{}/metrics")):
        if host == "::1" and not socket.has_ipv6:
            continue
        server = serve(ListenAddress(host, 0), source)
        try:
            req = urllib.request.Request(url.format(server.port), headers={
                "Accept": "application/openmetrics-text; version=1.0.0"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                body = resp.read().decode()
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            assert by_name(body)[names.METRIC_LIMIT_MAX]
        finally:
            server.close()


def test_unix_socket_replaces_a_stale_socket_and_refuses_other_files(tmp_path: Path,
                                                                      loop_thread) -> None:
    source = loop_thread.call(lambda: SnapshotSource(
        loop_thread.loop, lambda: sample_snapshot(time.monotonic())))
    path = tmp_path / "run" / "metrics.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # what a crashed run leaves
    server = serve(ListenAddress(path=str(path)), source)
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o666
        curl = subprocess.run(["curl", "-sS", "--max-time", "10", "--unix-socket", str(path),
                               "http://localhost/metrics"], capture_output=True, text=True,
                              timeout=15)
        assert curl.returncode == 0, curl.stderr
        assert by_name(curl.stdout, False)[names.METRIC_LIMIT_BYTES]
    finally:
        server.close()
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        serve(ListenAddress(path=str(path)), source)
    assert path.read_text() == "not a socket"
