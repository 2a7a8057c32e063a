"""Issue 3, diagnostics: every 5 s per limited process, a rate line with a verdict and an
eBPF line, with structured journal fields — captured from a real systemd-journald (private
mount namespace) and from the stderr fallback; plus the pure line/field builder."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from chadthrottle import names, verdict
from chadthrottle.bench.traffic import HttpServer, Transfer, curl_download
from chadthrottle.server import diagnostics
from chadthrottle.server.log import JournalHandler, parse_spec
from conftest import SRC, env_with, name_has_owner, requires_root, stop_pid

LIMIT = 256 * 1024
RATE_LINE = re.compile(
    r"^PID (\d+) \((.+)\) (download|upload): actual=\d+\.\d (KB|MB|GB)/s, "
    r"limit=\d+\.\d (KB|MB|GB)/s, ratio=\d+\.\d\dx (✅ THROTTLED|⚠️ THROTTLE NOT WORKING|"
    r"⚠️ eBPF program NOT BEING CALLED|"
    r"⚠️ NOT ENFORCING \(over the limit; nothing paced, queued or dropped\))$")
EBPF_LINE = re.compile(
    r"^eBPF stats PID (\d+) cgroup \S+ (download|upload): program_calls=\d+, packets=\d+, "
    r"dropped=\d+ \(\d+\.\d%\), bytes=\d+, bytes_dropped=\d+, sockets=\d+"
    r"(, queued=\d+, queue_dropped=\d+)?$")
STATUSES = {names.STATUS_THROTTLED, names.STATUS_NOT_WORKING, names.STATUS_PROGRAM_NOT_CALLED,
            names.STATUS_NOT_DROPPING}


# ---------------------------------------------------------------- pure: lines and fields
def _stats(**kw):
    base = dict(pid=12345, comm="wget", cgroup="/user.slice", download_limit=51200,
                upload_limit=0, download_rate=0.0, upload_rate=0.0, download_bytes=512000,
                upload_bytes=0, download_packets=500, upload_packets=0, download_dropped=4500,
                upload_dropped=0, download_dropped_bytes=460800, upload_dropped_bytes=0,
                program_calls=15234, download_calls=15234, upload_calls=0,
                status=names.STATUS_THROTTLED)
    base.update(kw)
    return SimpleNamespace(**base)


def test_seed_line_format_and_fields():
    win = verdict.Window(51200, 48.2 * 1024, 100, 10)
    rate, ebpf = diagnostics.lines_for(_stats(), "download", win)
    assert rate.message == ("PID 12345 (wget) download: actual=48.2 KB/s, limit=50.0 KB/s, "
                            "ratio=0.96x ✅ THROTTLED")
    assert ebpf.message == ("eBPF stats PID 12345 cgroup /user.slice download: "
                            "program_calls=15234, packets=5000, dropped=4500 (90.0%), "
                            "bytes=512000, bytes_dropped=460800, sockets=0, queued=0, "
                            "queue_dropped=0")
    assert rate.fields == {
        "CHADTHROTTLE_PID": "12345", "CHADTHROTTLE_COMM": "wget",
        "CHADTHROTTLE_CGROUP": "/user.slice", "CHADTHROTTLE_DIRECTION": "download",
        "CHADTHROTTLE_KIND": "rate", "CHADTHROTTLE_RATE": "49357",
        "CHADTHROTTLE_LIMIT": "51200", "CHADTHROTTLE_RATIO": "0.96",
        "CHADTHROTTLE_STATUS": "throttled",
    }
    assert ebpf.fields["CHADTHROTTLE_KIND"] == "ebpf"
    assert ebpf.fields["CHADTHROTTLE_DROPPED"] == "4500"
    assert RATE_LINE.match(rate.message) and EBPF_LINE.match(ebpf.message)


def test_issue9_rate_line_names_the_rule():
    """A limit a rule holds: the rule is named after the limit, and both lines carry
    CHADTHROTTLE_RULE (a SetLimit line stays as the seed wrote it, above)."""
    win = verdict.Window(51200, 48.2 * 1024, 100, 10)
    rate, ebpf = diagnostics.lines_for(_stats(rule="wget-rule"), "download", win)
    assert rate.message == ("PID 12345 (wget) download: actual=48.2 KB/s, limit=50.0 KB/s "
                            "(rule wget-rule), ratio=0.96x ✅ THROTTLED")
    assert rate.fields["CHADTHROTTLE_RULE"] == ebpf.fields["CHADTHROTTLE_RULE"] == "wget-rule"
    plain, _ = diagnostics.lines_for(_stats(rule=""), "download", win)
    assert "CHADTHROTTLE_RULE" not in plain.fields and "(rule" not in plain.message


@pytest.mark.parametrize("win, text", [
    (verdict.Window(51200, 349.7 * 1024, 100, 0),
     "⚠️ NOT ENFORCING (over the limit; nothing paced, queued or dropped)"),
    (verdict.Window(51200, 349.7 * 1024, 100, 5), "⚠️ THROTTLE NOT WORKING"),
    (verdict.Window(51200, 0.0, 0, 0, socket_rate=300 * 1024),
     "⚠️ eBPF program NOT BEING CALLED"),
    (verdict.Window(51200, 50 * 1024, 100, 5), "✅ THROTTLED"),
])
def test_verdicts(win, text):
    rate, _ = diagnostics.lines_for(_stats(), "download", win)
    assert rate.message.endswith(text), rate.message


def test_format_rate():
    assert diagnostics.format_rate(51200) == "50.0 KB/s"
    assert diagnostics.format_rate(1 << 20) == "1.0 MB/s"
    assert diagnostics.format_rate(3 << 30) == "3.0 GB/s"


def test_journal_handler_sends_structured_fields():
    import logging

    sent = []
    h = JournalHandler(send=lambda msg, **f: sent.append((msg, f)))
    rec = logging.LogRecord("chadthrottle.diagnostics", logging.WARNING, __file__, 1, "%s",
                            ("hi",), None)
    rec.journal = {"CHADTHROTTLE_PID": "7"}
    h.emit(rec)
    msg, fields = sent[0]
    assert msg == "hi" and fields["CHADTHROTTLE_PID"] == "7" and fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "chadthrottled"


def test_log_spec():
    import logging

    assert parse_spec("debug") == (logging.DEBUG, {})
    assert parse_spec("warn,chadthrottle.engine=trace") == (
        logging.WARNING, {"chadthrottle.engine": logging.DEBUG})
    with pytest.raises(ValueError):
        parse_spec("loud")


# ---------------------------------------------------------------- real daemon, real traffic
def _limited_download(address: str, seconds: float):
    srv = HttpServer().__enter__()
    tr = Transfer(curl_download(srv.url(1 << 40), seconds + 10), max_seconds=seconds + 10)
    return srv, tr


def _check_entries(entries: list[dict], pid: int) -> None:
    rate = [e for e in entries if e.get("CHADTHROTTLE_KIND") == "rate"
            and e.get("CHADTHROTTLE_DIRECTION") == "download"]
    ebpf = [e for e in entries if e.get("CHADTHROTTLE_KIND") == "ebpf"]
    assert len(rate) >= 2 and len(ebpf) >= 2, entries
    for e in rate:
        assert RATE_LINE.match(e["MESSAGE"]), e["MESSAGE"]
        assert e["CHADTHROTTLE_PID"] == str(pid)
        assert e["CHADTHROTTLE_STATUS"] in STATUSES
        float(e["CHADTHROTTLE_RATIO"])
        assert e["CHADTHROTTLE_LIMIT"] == str(LIMIT)
    for e in ebpf:
        assert EBPF_LINE.match(e["MESSAGE"]), e["MESSAGE"]
    # every 5 s
    ts = [int(e["__REALTIME_TIMESTAMP"]) / 1e6 for e in rate]
    gaps = [b - a for a, b in zip(ts, ts[1:], strict=False)]
    assert all(3.5 <= g <= 7.0 for g in gaps), gaps


@requires_root
@pytest.mark.slow
def test_journal_lines_every_5s_with_structured_fields(system_bus):
    if not os.path.exists("/lib/systemd/systemd-journald") or not shutil.which("unshare"):
        pytest.skip("systemd-journald or unshare missing")
    work = Path(tempfile.mkdtemp(prefix="chadthrottle-journal-"))
    ns = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", sys.executable,
         str(Path(__file__).with_name("journal_ns.py")), str(work), system_bus],
        env=env_with(system_bus), stderr=subprocess.PIPE, text=True)
    srv = tr = None
    try:
        deadline = time.monotonic() + 20
        while not name_has_owner(system_bus, names.BUS_NAME):
            assert ns.poll() is None, ns.stderr.read()
            assert time.monotonic() < deadline, "daemon in the namespace did not come up"
            time.sleep(0.1)
        daemon_pid = int((work / "daemon.pid").read_text())
        srv, tr = _limited_download(system_bus, 12)
        time.sleep(0.5)
        from conftest import dbus_send

        r = dbus_send(system_bus, "SetLimit", f"uint32:{tr.pid}", f"uint64:{LIMIT}", "uint64:0")
        assert r.ok, r
        time.sleep(11.5)  # two or three 5-s reports
        (work / "stop").write_text(str(tr.pid))
        ns.wait(30)
        assert ns.returncode == 0, ns.stderr.read()
        assert (work / "daemon.rc").read_text() == "0"
        entries = [json.loads(ln) for ln in (work / "journal.json").read_text().splitlines()
                   if ln.strip()]
        _check_entries(entries, tr.pid)
        assert all(e.get("SYSLOG_IDENTIFIER") == "chadthrottled" for e in entries)
        assert all(e.get("_PID") == str(daemon_pid) for e in entries)
        every = [json.loads(ln) for ln in (work / "all.json").read_text().splitlines() if ln]
        msgs = [e.get("MESSAGE", "") for e in every]
        assert any("attaching" in m.lower() or "Attaching" in m for m in msgs), msgs[:20]
        print("\n".join(e["MESSAGE"] for e in entries[:4]))
    finally:
        if tr is not None:
            tr.stop()
        if srv is not None:
            srv.__exit__()
        if ns.poll() is None:
            (work / "stop").write_text("0")
            try:
                ns.wait(30)
            except subprocess.TimeoutExpired:
                stop_pid(ns)
        shutil.rmtree(work, ignore_errors=True)


@requires_root
@pytest.mark.slow
def test_stderr_fallback_lines_every_5s(daemon):
    srv, tr = _limited_download(daemon.address, 12)
    try:
        time.sleep(0.5)
        assert daemon.call("SetLimit", f"uint32:{tr.pid}", f"uint64:{LIMIT}", "uint64:0").ok
        time.sleep(11.5)
    finally:
        tr.stop()
        srv.__exit__()
    lines = [ln.split(": ", 1)[1] for ln in daemon.log().splitlines()
             if "chadthrottle.diagnostics:" in ln]
    rate = [ln for ln in lines if ln.startswith(f"PID {tr.pid} ")]
    ebpf = [ln for ln in lines if ln.startswith(f"eBPF stats PID {tr.pid} ")]
    assert len(rate) >= 2 and len(ebpf) >= 2, daemon.log()[-3000:]
    assert all(RATE_LINE.match(ln) for ln in rate), rate
    assert all(EBPF_LINE.match(ln) for ln in ebpf), ebpf
    # steady state of a 256 KiB/s limit is judged THROTTLED
    assert rate[-1].endswith("✅ THROTTLED"), rate


def test_src_on_path():
    assert str(SRC) in sys.path
