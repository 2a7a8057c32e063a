"""Issue 7, item 8: a process named ``\\x1b]2;pwn\\x07\\x1b[2J`` (set with prctl(PR_SET_NAME),
as any user can) in a cgroup named with an escape sequence never reaches a terminal raw —
not through chadthrottlectl's human output (limit, stats, list, top, info, clear, errors,
run), not through its JSON, and not through the daemon's log lines (stderr and a real
systemd-journald), whose structured fields keep the raw value."""

from __future__ import annotations

import json
import os
import pty
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from chadthrottle import cgroups, names
from chadthrottle.bench.traffic import HttpServer
from conftest import env_with, name_has_owner, requires_root, stop_pid

pytestmark = requires_root

EVIL = "\x1b]2;pwn\x07\x1b[2J"  # retitle the terminal, then clear it (12 bytes < 16)
EVIL_SHOWN = "\\x1b]2;pwn\\x07\\x1b[2J"
CG_EVIL = "\x1b[31m"
CG_EVIL_SHOWN = "\\x1b[31m"
RAW = ("\x1b", "\x07", "\x9b")
MIB = 1 << 20

EVIL_PROCESS = """
import ctypes, sys, urllib.request
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)  # PR_SET_NAME
print("ready", flush=True)
sys.stdin.readline()  # go
while True:
    with urllib.request.urlopen(sys.argv[2]) as r:
        while r.read(65536):
            pass
"""


@pytest.fixture
def evil_cgroup():
    """A cgroup below the cgroup2 root whose name holds an escape sequence; removed after
    its processes are gone (this fixture is set up before, and torn down after, the
    daemon and the process)."""
    root = cgroups.cgroup2_mount()
    path = root / f"ct-{CG_EVIL}evil-{secrets.token_hex(3)}"
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(50):
            try:
                for p in (path / "cgroup.procs").read_text().split():
                    (root / "cgroup.procs").write_text(p)
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


@pytest.fixture
def evil_process(evil_cgroup):
    """A process named EVIL in the evil cgroup, parked until ``go()``; then it downloads
    without end from a local HTTP server.  Stopped by pid."""
    with HttpServer() as srv:
        proc = subprocess.Popen([sys.executable, "-c", EVIL_PROCESS, EVIL, srv.url(1 << 40)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            with open(f"/proc/{proc.pid}/comm", encoding="utf-8") as f:
                assert f.read().rstrip("\n") == EVIL
            (evil_cgroup / "cgroup.procs").write_text(str(proc.pid))

            def go() -> None:
                proc.stdin.write("go\n")
                proc.stdin.flush()

            proc.go = go
            yield proc
        finally:
            stop_pid(proc)


def _ctl(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chadthrottle.cli", *args],
                          env={**env_with(address), "COLUMNS": "200"}, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def _assert_safe(what: str, text: str) -> None:
    for ch in RAW:
        assert ch not in text, f"{what}: raw {ch!r} in {text!r}"


def _top_on_a_terminal(address: str, seconds: float) -> bytes:
    """`chadthrottlectl top` live on a pseudo-terminal for a while, then q."""
    master, slave = pty.openpty()
    env = {**env_with(address), "TERM": "xterm-256color", "LINES": "30", "COLUMNS": "200"}
    proc = subprocess.Popen([sys.executable, "-m", "chadthrottle.cli", "top", "-i", "0.5"],
                            stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    break
        os.write(master, b"q")
        proc.wait(10)
    finally:
        stop_pid(proc)
        os.close(master)
    return out


def test_issue7_terminal_escapes_never_reach_the_terminal(evil_cgroup, daemon, evil_process,
                                                          tmp_path):
    pid = evil_process.pid
    addr = daemon.address
    outputs: dict[str, subprocess.CompletedProcess] = {}

    r = outputs["limit"] = _ctl(addr, "limit", str(pid), "-d", "1MiB")
    assert r.returncode == 0, r.stderr
    assert f"Limited PID {pid} ({EVIL_SHOWN})" in r.stdout, r.stdout
    evil_process.go()
    time.sleep(3.5)  # traffic in the daemon's last window, rates from two samples

    r = outputs["stats"] = _ctl(addr, "stats", str(pid))
    assert r.returncode == 0, r.stderr
    assert f"PID {pid} ({EVIL_SHOWN})" in r.stdout and CG_EVIL_SHOWN in r.stdout, r.stdout
    r = outputs["stats --name"] = _ctl(addr, "stats", "--name", EVIL)
    assert r.returncode == 0 and f"PID {pid} ({EVIL_SHOWN})" in r.stdout, r
    r = outputs["list"] = _ctl(addr, "list")
    assert r.returncode == 0 and EVIL_SHOWN in r.stdout, r
    r = outputs["top"] = _ctl(addr, "top")  # a pipe: one snapshot
    assert r.returncode == 0 and "\\x1b]2;pwn" in r.stdout, r
    r = outputs["info"] = _ctl(addr, "info")
    assert r.returncode == 0 and CG_EVIL_SHOWN in r.stdout, r
    # JSON keeps the data exact, escaped as JSON escapes
    for cmd in (("stats", "--json", str(pid)), ("list", "--json"), ("top", "--json")):
        r = outputs[" ".join(cmd)] = _ctl(addr, *cmd)
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        rows = data if isinstance(data, list) else [data]
        assert any(row.get("comm") == EVIL for row in rows), data
    # errors carry names too: a unit, a command that cannot be executed
    r = outputs["unit error"] = _ctl(addr, "unit", "limit", f"{EVIL}.service", "-d", "1M")
    assert r.returncode == 1 and names.ERR_NO_SUCH_UNIT in r.stderr, r
    bad = tmp_path / f"{EVIL}cmd"
    bad.write_text("not executable")
    r = outputs["run error"] = _ctl(addr, "run", "-d", "1M", "--", str(bad))
    assert r.returncode == 126 and "\\x1b]2;pwn" in r.stderr, r
    live = _top_on_a_terminal(addr, 2.5)
    assert b"\\x1b]2;pwn" in live, live[-2000:]
    assert b"\x1b]2;" not in live and b"\x07" not in live, live[-2000:]
    r = outputs["clear"] = _ctl(addr, "clear", str(pid))
    assert r.returncode == 0 and f"Cleared the limit of PID {pid} ({EVIL_SHOWN})" in r.stdout, r

    for what, r in outputs.items():
        _assert_safe(what + " stdout", r.stdout)
        _assert_safe(what + " stderr", r.stderr)

    # the daemon's own lines (stderr target here): the limit, the attachment, diagnostics
    deadline = time.monotonic() + 10
    log = daemon.log()
    while f"PID {pid} ({EVIL_SHOWN}) download: actual=" not in log:
        assert time.monotonic() < deadline, log[-3000:]
        time.sleep(0.5)
        log = daemon.log()
    _assert_safe("daemon log", log)
    assert f"PID {pid} ({EVIL_SHOWN}): limit download=" in log, log[-3000:]
    assert any("ttaching" in line and CG_EVIL_SHOWN in line for line in log.splitlines()), \
        log[-3000:]


@pytest.mark.slow
def test_issue7_terminal_escapes_journal_message_escaped_fields_raw(evil_cgroup, system_bus,
                                                                    evil_process):
    """With a real systemd-journald: MESSAGE of every chadthrottled entry is free of
    control characters, CHADTHROTTLE_COMM keeps the raw name."""
    if not os.path.exists("/lib/systemd/systemd-journald") or not shutil.which("unshare"):
        pytest.skip("systemd-journald or unshare missing")
    work = Path(tempfile.mkdtemp(prefix="chadthrottle-journal-"))
    ns = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", sys.executable,
         str(Path(__file__).with_name("journal_ns.py")), str(work), system_bus],
        env=env_with(system_bus), stderr=subprocess.PIPE, text=True)
    pid = evil_process.pid
    try:
        deadline = time.monotonic() + 20
        while not name_has_owner(system_bus, names.BUS_NAME):
            assert ns.poll() is None, ns.stderr.read()
            assert time.monotonic() < deadline, "daemon in the namespace did not come up"
            time.sleep(0.1)
        r = _ctl(system_bus, "limit", str(pid), "-d", "1MiB")
        assert r.returncode == 0, r.stderr
        evil_process.go()
        time.sleep(7)  # at least one 5-s report
        (work / "stop").write_text(str(pid))
        ns.wait(30)
        assert ns.returncode == 0, ns.stderr.read()
        entries = [json.loads(ln) for ln in (work / "all.json").read_text().splitlines() if ln]
    finally:
        if ns.poll() is None:
            (work / "stop").write_text("0")
            try:
                ns.wait(30)
            except subprocess.TimeoutExpired:
                stop_pid(ns)
        shutil.rmtree(work, ignore_errors=True)
    ours = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "chadthrottled"]
    assert ours, entries[:5]
    for e in ours:
        # journalctl's JSON gives a message with control characters as an array of bytes
        assert isinstance(e["MESSAGE"], str), e
        _assert_safe("journal MESSAGE", e["MESSAGE"])
    rate = [e for e in ours if e.get("CHADTHROTTLE_KIND") == "rate"
            and e.get("CHADTHROTTLE_PID") == str(pid)]
    assert rate, [e["MESSAGE"] for e in ours]
    assert f"PID {pid} ({EVIL_SHOWN}) download:" in rate[0]["MESSAGE"], rate[0]
    comm = rate[0]["CHADTHROTTLE_COMM"]
    raw = bytes(comm).decode() if isinstance(comm, list) else comm
    assert raw == EVIL, comm
    assert any(CG_EVIL_SHOWN in e["MESSAGE"] and "ttaching" in e["MESSAGE"] for e in ours)
