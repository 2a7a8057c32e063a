"""chadthrottlectl against the real daemon on a private bus (issue 4).

Every subcommand is run as a real subprocess (``python -m chadthrottle.cli``), talking to
the real chadthrottled of the ``daemon`` fixture over the private bus of ``system_bus``;
real traffic comes from curl against a local HTTP server.  Everything a test starts is
stopped by pid (and every cgroup it makes removed) even when it fails.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import chadthrottle
from chadthrottle import names
from chadthrottle.cli.render import INFO_KEYS, LIST_KEYS, RULE_KEY, STATS_KEYS

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the daemon loads BPF)"),
]

SOURCE_ROOT = str(Path(chadthrottle.__file__).resolve().parents[1])
MIB = 1024 * 1024
CLI_TIMEOUT = 60


# --- helpers -------------------------------------------------------------------------------------
def bus_address(system_bus) -> str:
    return getattr(system_bus, "address", system_bus)


def cli_env(address: str, **extra: str) -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "DBUS_SYSTEM_BUS_ADDRESS": address,
        "PYTHONPATH": SOURCE_ROOT + (os.pathsep + path if path else ""),
        "COLUMNS": "160",
        **extra,
    }


@pytest.fixture
def bus_env(system_bus, daemon) -> dict[str, str]:
    """The environment of a chadthrottlectl that talks to the test's daemon."""
    return cli_env(bus_address(system_bus))


@pytest.fixture
def ctl(bus_env):
    """Run chadthrottlectl with the given arguments; returns the CompletedProcess."""
    env = bus_env

    def run(*args: str, timeout: float = CLI_TIMEOUT, env_extra: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "chadthrottle.cli", *args],
            env={**env, **(env_extra or {})}, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL, **kw,
        )

    return run


@contextlib.contextmanager
def started(argv: list[str], **kw) -> Iterator[subprocess.Popen]:
    """A process that is killed (by pid) and reaped whatever happens."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def sleep_argv(tmp_path: Path, name: str | None = None) -> list[str]:
    """argv of a long sleep, optionally under a unique comm (a symlink to sleep)."""
    if name is None:
        return ["sleep", "300"]
    link = tmp_path / name
    if not link.exists():
        link.symlink_to(shutil.which("sleep"))
    return [str(link), "300"]


def list_json(ctl) -> list[dict]:
    r = ctl("list", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


class _Bytes(http.server.BaseHTTPRequestHandler):
    """GET /N sends N zero bytes (bounded), in 64 KiB writes."""

    timeout = 60
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802
        try:
            n = min(int(self.path.strip("/")), 64 * MIB)
        except ValueError:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        chunk = bytes(64 * 1024)
        try:
            while n > 0:
                self.wfile.write(chunk[: min(n, len(chunk))])
                n -= len(chunk)
        except OSError:
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Bytes)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def cgroup2_mount() -> Path:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return Path(left.split()[4])
    pytest.skip("no cgroup2 mount")


# --- read commands -----------------------------------------------------------------------------
def test_info_human_and_json(ctl) -> None:
    r = ctl("info")
    assert r.returncode == 0, r.stderr
    assert f"chadthrottled {chadthrottle.__version__}" in r.stdout
    r = ctl("info", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert tuple(data) == INFO_KEYS
    assert data["version"] == chadthrottle.__version__
    assert isinstance(data["attached_cgroups"], list)


def test_limit_list_stats_clear_cycle(ctl, tmp_path) -> None:
    with started(sleep_argv(tmp_path)) as p:
        r = ctl("limit", str(p.pid), "-d", "50K", "-u", "1M")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == \
            f"Limited PID {p.pid} (sleep): download 50 KB/s, upload 1 MB/s"

        rows = list_json(ctl)
        assert {"pid": p.pid, "comm": "sleep", "download_limit": 50_000,
                "upload_limit": 1_000_000}.items() <= \
            next(x for x in rows if x["pid"] == p.pid).items()
        # a daemon that reports rules adds "rule" (issue 9)
        assert all(tuple(row)[:len(LIST_KEYS)] == LIST_KEYS
                   and set(row) <= {*LIST_KEYS, RULE_KEY} for row in rows)

        # a direction not given keeps its limit
        r = ctl("limit", str(p.pid), "-u", "512KiB/s")
        assert r.returncode == 0, r.stderr
        row = next(x for x in list_json(ctl) if x["pid"] == p.pid)
        assert (row["download_limit"], row["upload_limit"]) == (50_000, 524_288)

        r = ctl("list")
        assert r.returncode == 0 and str(p.pid) in r.stdout
        assert "50 KB/s" in r.stdout and "512 KiB/s" in r.stdout

        r = ctl("stats", str(p.pid), "--json")
        assert r.returncode == 0, r.stderr
        stats = json.loads(r.stdout)
        assert tuple(stats)[: len(STATS_KEYS)] == STATS_KEYS
        assert stats["pid"] == p.pid and stats["comm"] == "sleep"
        assert (stats["download_limit"], stats["upload_limit"]) == (50_000, 524_288)
        assert isinstance(stats["download_rate"], float)
        assert stats["status"] in {names.STATUS_THROTTLED, names.STATUS_NOT_WORKING,
                                   names.STATUS_PROGRAM_NOT_CALLED, names.STATUS_NOT_DROPPING}

        r = ctl("--json", "stats", str(p.pid))  # --json before the command too
        assert json.loads(r.stdout)["pid"] == p.pid

        r = ctl("stats", str(p.pid))
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"PID {p.pid} (sleep)")
        assert "limit 50 KB/s" in r.stdout and "limit 512 KiB/s" in r.stdout

        r = ctl("clear", str(p.pid))
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"Cleared the limit of PID {p.pid} (sleep)"
        assert p.pid not in [x["pid"] for x in list_json(ctl)]

        r = ctl("clear", str(p.pid))
        assert r.returncode == 1
        assert f"[{names.ERR_NO_SUCH_LIMIT}]" in r.stderr and "has no limit" in r.stderr

        # stats works on an unlimited process too
        stats = json.loads(ctl("stats", str(p.pid), "--json").stdout)
        assert stats["status"] == names.STATUS_UNLIMITED
        assert (stats["download_limit"], stats["upload_limit"]) == (0, 0)


def test_limit_and_clear_by_name(ctl, tmp_path) -> None:
    name = "ctl" + uuid.uuid4().hex[:10]  # <= 15 chars: it is the comm
    with started(sleep_argv(tmp_path, name)) as p:
        r = ctl("limit", "--name", name, "-d", "1M")
        assert r.returncode == 0, r.stderr
        assert f"PID {p.pid} ({name})" in r.stdout
        assert any(x["pid"] == p.pid and x["download_limit"] == 1_000_000
                   for x in list_json(ctl))
        r = ctl("stats", "--name", name, "--json")
        assert json.loads(r.stdout)["pid"] == p.pid

        with started(sleep_argv(tmp_path, name)) as q:
            r = ctl("limit", "--name", name, "-d", "2M")
            assert r.returncode == 2
            assert f"2 processes are called '{name}'" in r.stderr
            assert str(p.pid) in r.stderr and str(q.pid) in r.stderr
        r = ctl("clear", "--name", name)
        assert r.returncode == 0, r.stderr
        assert p.pid not in [x["pid"] for x in list_json(ctl)]

    r = ctl("limit", "--name", name, "-d", "1M")
    assert r.returncode == 1
    assert f"no such process: nothing is called '{name}'" in r.stderr


def test_unit_limit_and_clear(ctl) -> None:
    root = cgroup2_mount()
    rel = f"chadthrottle-clitest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    cg = root / rel
    cg.mkdir()
    try:
        r = ctl("unit", "limit", rel, "-d", "2M", "-u", "1MiB")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"Limited unit {rel}: download 2 MB/s, upload 1 MiB/s"
        r = ctl("unit", "clear", rel)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"Cleared the limit of unit {rel}"
    finally:
        ctl("unit", "clear", rel)
        cg.rmdir()

    r = ctl("unit", "limit", "no-such-unit-for-chadthrottle.scope", "-d", "1M")
    assert r.returncode == 1
    assert f"[{names.ERR_NO_SUCH_UNIT}]" in r.stderr and "no such unit" in r.stderr


# --- error exits --------------------------------------------------------------------------------
def test_no_such_process_exit_1(ctl) -> None:
    pid = 2**31 - 7  # above any pid_max
    for args in (("stats", str(pid)), ("limit", str(pid), "-d", "1M"), ("clear", str(pid))):
        r = ctl(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert f"[{names.ERR_NO_SUCH_PROCESS}]" in r.stderr or \
            f"[{names.ERR_NO_SUCH_LIMIT}]" in r.stderr
    r = ctl("stats", str(pid))
    assert "no such process" in r.stderr


def test_invalid_limit_from_the_daemon_exit_1(ctl) -> None:
    r = ctl("limit", "1", "-d", "1M")
    assert r.returncode == 1
    assert f"[{names.ERR_INVALID_LIMIT}]" in r.stderr and "invalid limit" in r.stderr


def test_usage_errors_exit_2(ctl) -> None:
    r = ctl("limit", "12", "-d", "10Mbps")
    assert r.returncode == 2 and "ambiguous" in r.stderr
    r = ctl("limit", "12")
    assert r.returncode == 2
    r = ctl("run", "-d", "1M")
    assert r.returncode == 2


def test_not_authorized_names_the_polkit_action(ctl, bus_env, tmp_path) -> None:
    """An unprivileged caller (no polkit on the private bus) may not limit a root process:
    exit 1, and the message names the polkit actions."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv not installed")
    with started(sleep_argv(tmp_path)) as p:
        r = subprocess.run(
            [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--",
             sys.executable, "-m", "chadthrottle.cli", "limit", str(p.pid), "-d", "1M"],
            env=bus_env, capture_output=True, text=True, timeout=CLI_TIMEOUT,
            stdin=subprocess.DEVNULL, cwd="/",
        )
        if r.returncode != 1 and "Permission denied" in r.stderr:
            pytest.skip(f"uid 65534 cannot run this interpreter: {r.stderr.strip()}")
        assert r.returncode == 1, r.stderr
        assert "not authorized" in r.stderr
        assert names.POLKIT_ACTION_LIMIT_ANY in r.stderr
        assert f"[{names.ERR_NOT_AUTHORIZED}]" in r.stderr or \
            "[org.freedesktop.DBus.Error.AccessDenied]" in r.stderr
        assert p.pid not in [x["pid"] for x in list_json(ctl)]


def test_daemon_not_running_says_how_to_start_it(tmp_path) -> None:
    """A bus without chadthrottled, and no bus at all: exit 1 with the start command."""
    sock = tmp_path / "bus"
    with started(["dbus-daemon", "--session", "--nofork", "--nopidfile",
                  f"--address=unix:path={sock}"], stdout=subprocess.DEVNULL) as bus:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert bus.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        r = subprocess.run([sys.executable, "-m", "chadthrottle.cli", "list"],
                           env=cli_env(f"unix:path={sock}"), capture_output=True, text=True,
                           timeout=CLI_TIMEOUT)
    assert r.returncode == 1
    assert "not running" in r.stderr and "sudo systemctl start chadthrottled" in r.stderr
    assert "[org.freedesktop.DBus.Error.ServiceUnknown]" in r.stderr

    r = subprocess.run([sys.executable, "-m", "chadthrottle.cli", "stats", "1"],
                       env=cli_env(f"unix:path={tmp_path}/nothing-here"), capture_output=True,
                       text=True, timeout=CLI_TIMEOUT)
    assert r.returncode == 1
    assert "sudo systemctl start chadthrottled" in r.stderr and "make run" in r.stderr
    assert "[org.chadthrottle.Throttle1.Client.NoBus]" in r.stderr


# --- run -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_holds_a_curl_download_with_children_included(ctl, http_server) -> None:
    """`run -d 1MiB -- sh -c 'curl …'`: the limit is on sh; curl, its child, is held."""
    size = 6 * MIB  # ~6 s at the limit; bounded in bytes and (--max-time) in time
    script = (f'curl -s -o /dev/null --max-time 40 -w "%{{size_download}} %{{time_total}}\\n" '
              f'{http_server}/{size}; rc=$?; exit $rc')  # not the last command: sh stays parent
    before = {x["pid"] for x in list_json(ctl)}
    t0 = time.monotonic()
    r = ctl("run", "-d", "1MiB", "--", "sh", "-c", script, timeout=90)
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    got, seconds = r.stdout.split()
    got, seconds = int(got), float(seconds)
    assert got == size
    ratio = got / seconds / MIB
    print(f"run -d 1MiB -- sh -c 'curl …': {got} B in {seconds:.2f} s = {ratio:.3f}x the limit")
    assert 0.8 <= ratio <= 1.25, f"achieved {ratio:.3f}x of 1 MiB/s over {seconds:.2f} s"
    assert wall >= seconds
    # the limit is gone once the command ended
    assert {x["pid"] for x in list_json(ctl)} <= before


def test_run_exit_codes(ctl) -> None:
    r = ctl("run", "-d", "1M", "--", "sh", "-c", "exit 7")
    assert r.returncode == 7, r.stderr
    r = ctl("run", "-u", "1M", "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + signal.SIGTERM
    r = ctl("run", "-d", "1M", "--", "/nonexistent/command")
    assert r.returncode == 127 and "No such file" in r.stderr


def test_run_limits_before_the_command_starts(ctl) -> None:
    """The command sees its own limit in its first instruction (no unlimited start)."""
    probe = (
        "import json, os, subprocess, sys; "
        "r = subprocess.run([sys.executable, '-m', 'chadthrottle.cli', 'stats', "
        "str(os.getpid()), '--json'], capture_output=True, text=True); "
        "print(r.stdout if r.returncode == 0 else 'ERR ' + r.stderr)"
    )
    r = ctl("run", "-d", "2M", "-u", "1MiB", "--", sys.executable, "-c", probe)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)
    assert (stats["download_limit"], stats["upload_limit"]) == (2_000_000, MIB)


def test_run_never_starts_the_command_unlimited(ctl, tmp_path) -> None:
    """When no limit can be set (here: no bus), the command is not run at all."""
    marker = tmp_path / "ran"
    env_extra = {"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/nothing"}
    r = ctl("run", "-d", "1M", "--", "touch", str(marker), env_extra=env_extra)
    assert r.returncode == 1 and "NoBus" in r.stderr
    assert not marker.exists()


def test_run_forwards_sigterm_and_clears_the_limit(ctl, bus_env) -> None:
    with started([sys.executable, "-m", "chadthrottle.cli", "run", "-d", "1M", "--",
                  "sleep", "300"], env=bus_env) as run:
        deadline = time.monotonic() + 15
        while not (kids := _children(run.pid)) or \
                kids[0] not in [x["pid"] for x in list_json(ctl)]:
            assert run.poll() is None and time.monotonic() < deadline, "not limited in time"
            time.sleep(0.1)
        child = kids[0]
        with open(f"/proc/{child}/comm") as f:
            assert f.read().strip() == "sleep"
        run.send_signal(signal.SIGTERM)
        assert run.wait(15) == 128 + signal.SIGTERM
    assert not os.path.exists(f"/proc/{child}")
    assert child not in [x["pid"] for x in list_json(ctl)]


# --- top -----------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


@contextlib.contextmanager
def limited_download(bus_env: dict, url: str) -> Iterator[int]:
    """`chadthrottlectl run -d 1MiB -- curl URL` in the background; yields curl's pid once
    it has moved bytes for a while."""
    with started([sys.executable, "-m", "chadthrottle.cli", "run", "-d", "1MiB", "--",
                  "curl", "-s", "-o", "/dev/null", "--max-time", "40", url],
                 env=bus_env, stdout=subprocess.DEVNULL) as run:
        deadline = time.monotonic() + 15
        while not _children(run.pid):
            assert run.poll() is None and time.monotonic() < deadline, "run did not start curl"
            time.sleep(0.05)
        curl = _children(run.pid)[0]
        time.sleep(2.5)  # traffic in the daemon's last window
        try:
            yield curl
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(curl, signal.SIGTERM)  # run reaps it and exits


@pytest.mark.slow
def test_top_prints_one_snapshot_when_not_a_terminal(ctl, bus_env, http_server) -> None:
    with limited_download(bus_env, f"{http_server}/{12 * MIB}") as curl:
        r = ctl("top", timeout=30)  # stdout is a pipe: one snapshot, then exit
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].split()[:3] == ["PID", "NAME", "DOWN"]
        row = next(line for line in lines if line.split()[:2] == [str(curl), "curl"])
        assert "1 MiB/s" in row and "throttled" in row
        assert "processes with traffic" in r.stdout or "process with traffic" in r.stdout

        r = ctl("top", "--json", timeout=30)
        assert r.returncode == 0, r.stderr
        procs = json.loads(r.stdout)
        assert all(tuple(p)[: len(STATS_KEYS)] == STATS_KEYS for p in procs)
        totals = [p["download_rate"] + p["upload_rate"] for p in procs]
        assert totals == sorted(totals, reverse=True)
        mine = next(p for p in procs if p["pid"] == curl)
        assert mine["download_limit"] == MIB and mine["comm"] == "curl"
        assert 0 < mine["download_rate"] <= 1.5 * MIB


def read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the other side closed
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_top_live_on_a_terminal_quits_on_q(bus_env) -> None:
    """On a terminal, `top` redraws until `q` is pressed, then exits 0."""
    master, slave = pty.openpty()
    env = {**bus_env, "TERM": "xterm-256color", "LINES": "30"}
    try:
        proc = subprocess.Popen([sys.executable, "-m", "chadthrottle.cli", "top", "-i", "0.3"],
                                stdin=slave, stdout=slave, stderr=slave, env=env,
                                start_new_session=True)
        try:
            os.close(slave)
            slave = -1
            seen = read_until(master, b"q to quit", 20)
            assert b"PID" in seen and b"q to quit" in seen, seen[-500:]
            seen = read_until(master, b"q to quit", 2)  # at least one more refresh
            os.write(master, b"q")
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
