"""Issue 11, item 1: chadthrottled under a real systemd, as a user meets it.

systemd 252 runs as PID 1 in a container on this machine (nspawn_machine.py: how it boots and
what BPF needed inside); the ``machine`` fixture installs the project in it with
``make install`` and tears it all down, failing the run if anything is left on the host.
Skipped only where containers cannot run (not root, or namespaces refused), with the reason.
No conftest.py here on purpose: tests/dbus imports its own ``conftest`` module by name.
Each test brings the daemon to the state it needs (``ensure_running``), so one failure does
not hide the next.  Everything inside runs through the container's own systemctl, dbus-send,
journalctl, bpftool, tc and ip.

The daemon runs in the container's own PID and cgroup namespaces: the limit checks hold only
because the engine translates the kernel's pids to the daemon's namespace and counts cgroup
levels from the real root (this test found both).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from nspawn_machine import (
    Machine,
    MachineError,
    Result,
    cannot_run_containers,
    copy_source,
    ensure_tree,
    install,
)

from chadthrottle import names

ROOT = Path(__file__).resolve().parents[2]
BPF_OBJECT = "daemon/chadthrottle/data/throttle.bpf.o"
#: the built clone: the object and the header it was built from (same mtimes as on the host)
BUILT_FILES = (BPF_OBJECT, "bpf/vmlinux.h")
HOST_TOOLS = ("mmdebstrap", "systemd-nspawn", "nsenter", "git", "ip")
UNIT = "chadthrottled"
DEST = names.BUS_NAME
OBJ = names.OBJECT_PATH
IFACE = names.INTERFACE
MiB = 1 << 20
KiB = 1 << 10
DROPINS = "/run/systemd/system/chadthrottled.service.d"
CT = "/run/ct"  # gates and results of the test transfers, inside the container
GATED_CURL = "/usr/local/libexec/chadthrottle-test/gated-curl"
WEB = "http://127.0.0.1:8000"
#: the unit's CapabilityBoundingSet: CAP_NET_ADMIN 12, CAP_SYS_PTRACE 19, CAP_PERFMON 38, CAP_BPF 39
UNIT_CAPS = (1 << 12) | (1 << 19) | (1 << 38) | (1 << 39)
EXPOSURE_MAX = 3.0

GATED_CURL_SCRIPT = r"""#!/bin/sh
# gated-curl GATE OUT URL [curl options]: wait until GATE exists, then become curl (same pid,
# so a limit set on this pid applies from curl's first packet); "bytes seconds bytes/s" -> OUT
gate=$1 out=$2; shift 2
while [ ! -e "$gate" ]; do sleep 0.05; done
exec curl -sS -o /dev/null -w '%{size_download} %{time_total} %{speed_download}\n' "$@" >"$out"
"""


# ---- helpers -----------------------------------------------------------------------------------

def show(m: Machine, *props: str, unit: str = UNIT) -> dict[str, str]:
    r = m.run(f"systemctl show {unit} " + " ".join(f"-p {p}" for p in props))
    return dict(line.split("=", 1) for line in r.out.splitlines() if "=" in line)


def is_ready(m: Machine, not_pid: int | None = None) -> bool:
    st = show(m, "ActiveState", "SubState", "MainPID", "StatusText")
    return (st["ActiveState"] == "active" and st["SubState"] == "running"
            and st["MainPID"] not in ("0", str(not_pid))
            and st["StatusText"].startswith("serving "))


def wait_ready(m: Machine, timeout: float = 30, not_pid: int | None = None) -> int:
    what = f"{UNIT} to be active (running) with STATUS=serving"
    if not_pid:
        what += f" under a new main pid (not {not_pid})"
    try:
        m.wait_for(what, lambda: is_ready(m, not_pid), timeout)
    except AssertionError as e:
        status = m.run(f"systemctl status {UNIT} --no-pager -n 20", check=False)
        raise AssertionError(f"{e}\n{status.out}") from None
    return int(show(m, "MainPID")["MainPID"])


def ensure_running(m: Machine) -> int:
    if not is_ready(m):
        m.run(f"systemctl reset-failed {UNIT}", check=False)
        m.run(f"systemctl start {UNIT}")
    return wait_ready(m)


def call(m: Machine, member: str, *args: str) -> Result:
    return m.run(f"dbus-send --system --print-reply --reply-timeout=30000 --dest={DEST} {OBJ} "
                 f"{IFACE}.{member} " + " ".join(args), check=False, timeout=40)


def must(r: Result, what: str) -> Result:
    """A step that is not the point of the test: its failure is an error, never an xfail."""
    if not r.ok:
        raise MachineError(f"{what} failed:\n{r}")
    return r


def cursor(m: Machine) -> str:
    out = m.run("journalctl -n 1 --show-cursor --no-pager -o cat").out
    for line in out.splitlines():
        if line.startswith("-- cursor: "):
            return line.removeprefix("-- cursor: ").strip()
    raise MachineError(f"no journal cursor in: {out!r}")


def journal_after(m: Machine, cur: str, args: str = f"-u {UNIT}") -> str:
    return m.run(f"journalctl --no-pager --after-cursor='{cur}' {args}").out


def dropin(m: Machine, name: str, text: str) -> None:
    m.write(f"{DROPINS}/{name}.conf", "[Service]\n" + text)
    m.run("systemctl daemon-reload")


def remove_dropin(m: Machine, name: str) -> None:
    m.run(f"rm -f {DROPINS}/{name}.conf && systemctl daemon-reload")


def start_download(m: Machine, unit: str, path: str, *curl_args: str) -> int:
    """A curl in its own transient unit, held at a gate; returns its pid (curl's, once
    released)."""
    m.run(f"systemd-run --quiet --unit={unit} -p Type=exec -p CollectMode=inactive-or-failed "
          f"{GATED_CURL} {CT}/{unit}.go {CT}/{unit}.out {WEB}/{path} " + " ".join(curl_args))
    return int(show(m, "MainPID", unit=unit)["MainPID"])


def finish_download(m: Machine, unit: str, timeout: float) -> tuple[int, float, float]:
    m.run(f"touch {CT}/{unit}.go")
    m.wait_for(f"{unit} to end", lambda: not m.run(f"systemctl is-active -q {unit}",
                                                   check=False).ok, timeout)
    out = m.run(f"cat {CT}/{unit}.out", check=False).out.split()
    if len(out) != 3:
        raise MachineError(f"{unit}: no curl result ({out!r})")
    return int(out[0]), float(out[1]), float(out[2])


def daemon_bpf_ids(m: Machine, pid: int) -> dict[str, set[int]]:
    """The programs and links the daemon holds, from the fdinfo of its descriptors."""
    out = m.run(f"cat /proc/{pid}/fdinfo/* 2>/dev/null | grep -E '^(prog_id|link_id):' || true").out
    ids: dict[str, set[int]] = {"prog_id": set(), "link_id": set()}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        ids[key.strip()].add(int(value))
    return ids


def cgroup_attached(m: Machine) -> dict[int, str]:
    """program id -> 'cgroup attach_type name' for every program attached in the container's
    cgroup2 tree (its cgroup namespace: only the container's cgroups)."""
    out = m.run("bpftool cgroup tree /sys/fs/cgroup/unified").out
    attached, cg = {}, ""
    for line in out.splitlines():
        if line.startswith("/"):
            cg = line.strip()
        elif re.match(r"\s+\d+\s", line):
            f = line.split()
            attached[int(f[0])] = f"{cg} {f[1]} {f[-1]}"
    return attached


# ---- fixtures ----------------------------------------------------------------------------------

def _say(request, text: str) -> None:
    """A line in the run's output even under capture (timings, teardown, the skip reason)."""
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capman is None:
        print(f"[systemd] {text}", file=sys.stderr)
        return
    with capman.global_and_fixture_disabled():
        tr.write_line(f"[systemd] {text}")


@pytest.fixture(scope="module")
def machine(request):
    reason = cannot_run_containers()
    if reason:
        _say(request, f"skipped: {reason}")
        pytest.skip(reason)
    missing = [t for t in HOST_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing on the host: {', '.join(missing)} (make deps installs mmdebstrap "
                    "and systemd-container)")
    if not (ROOT / BPF_OBJECT).exists():
        pytest.fail(f"{BPF_OBJECT} missing: run `make build` (the object is built on the host "
                    "and shipped as package data)")
    t0 = time.monotonic()
    failed_before = request.session.testsfailed
    try:
        tree, build_s = ensure_tree(lambda s: _say(request, s))
    except MachineError as e:
        pytest.fail(str(e))
    _say(request, f"tree {tree} " + (f"built in {build_s:.1f} s" if build_s else "(cached)"))
    source = Path(tempfile.mkdtemp(prefix="chadthrottle-src-"))
    m = Machine(tree, source, log=lambda s: _say(request, s))
    try:
        copy_source(ROOT, source, BUILT_FILES)
        boot_s = m.boot()
        _say(request, f"booted systemd as PID 1 in {boot_s:.1f} s")
        install(m)
        m.baseline = m.network_state()
        _say(request, f"ready after {time.monotonic() - t0:.1f} s")
        yield m
    finally:
        journal = ""
        if m.leader is not None and request.session.testsfailed > failed_before:
            journal = m.run("journalctl -b --no-pager -n 150 -o short-monotonic",
                            check=False).out
        forced = m.teardown()
        left = m.leftovers()
        _say(request, f"torn down; the whole module took {time.monotonic() - t0:.1f} s")
        if journal:
            _say(request, "last journal lines of the container:\n" + journal)
        for line in forced:
            _say(request, f"teardown: {line}")
        if left:
            pytest.fail("the container left things on the host:\n" + "\n".join(left))


@pytest.fixture(scope="module")
def web(machine):
    """A static HTTP server on the container's loopback (its own unit), and the gate script."""
    m = machine
    m.write(GATED_CURL, GATED_CURL_SCRIPT, mode="0755")
    m.run(f"mkdir -p {CT} /srv/ct && head -c {64 * MiB} /dev/zero > /srv/ct/64M "
          f"&& head -c {6 * MiB} /dev/zero > /srv/ct/6M")
    m.run("systemd-run --quiet --unit=ct-http -p Type=exec "
          "python3 -m http.server --bind 127.0.0.1 --directory /srv/ct 8000")
    try:
        m.wait_for("the test HTTP server", lambda: m.run(f"curl -sf -o /dev/null {WEB}/6M",
                                                         check=False).ok, 20)
        yield WEB
    finally:
        if m.leader is not None:
            m.run("systemctl stop ct-http", check=False)


# ---- 1. bus activation -------------------------------------------------------------------------

def test_first_dbus_send_activates_the_service(machine):
    m = machine
    before = show(m, "ActiveState")["ActiveState"]
    assert before == "inactive", f"{UNIT} must not run before the first call, it is {before}"
    cur = cursor(m)
    r = call(m, "ListLimits")
    assert r.ok, f"the first dbus-send did not activate {UNIT}:\n{r}\n" + m.run(
        f"systemctl status {UNIT} --no-pager -n 30", check=False).out
    assert "array [" in r.out, r
    wait_ready(m, timeout=10)
    bus_log = journal_after(m, cur, "-u dbus -o cat")
    assert f"Activating via systemd: service name='{DEST}' unit='{UNIT}.service'" in bus_log, (
        "dbus-daemon did not start the unit through SystemdService=:\n" + bus_log)


# ---- 2. READY and STATUS -----------------------------------------------------------------------

def test_systemctl_status_shows_ready_and_status_line(machine):
    m = machine
    ensure_running(m)
    out = m.run(f"systemctl status {UNIT} --no-pager", check=False).out
    assert re.search(r"Active: active \(running\)", out), (
        "Type=notify: active (running) only after READY=1, got:\n" + out)
    assert re.search(r'Status: "serving org\.chadthrottle\.Throttle1, \d+ limits"', out), (
        "the daemon's STATUS= line is missing:\n" + out)
    assert show(m, "Type")["Type"] == "notify"


def test_chadthrottlectl_works_with_the_debian_packages(machine):
    """The CLI installed by make install runs on bookworm's python3-dbus-fast and
    python3-rich (the runtime dependencies come from the Debian packages, not pip)."""
    m = machine
    ensure_running(m)
    ver = m.run("dpkg-query -W -f='${Version}' python3-dbus-fast").out
    r = m.run("chadthrottlectl list --json", check=False)
    assert r.ok, f"chadthrottlectl with python3-dbus-fast {ver}:\n{r}"
    assert isinstance(json.loads(r.out), list), r.out
    r = m.run("chadthrottlectl list", check=False)
    assert r.ok, f"chadthrottlectl (rich output) with python3-rich:\n{r}"


# ---- 3. a limit holds a real transfer ----------------------------------------------------------

def test_setlimit_holds_a_real_transfer(machine, web):
    m = machine
    ensure_running(m)
    limit = MiB
    pid = start_download(m, "ct-dl-pid", "6M", "--max-time", "30")
    must(call(m, "SetLimit", f"uint32:{pid}", f"uint64:{limit}", "uint64:0"), "SetLimit")
    size, secs, speed = finish_download(m, "ct-dl-pid", timeout=40)
    if size != 6 * MiB:
        raise MachineError(f"curl got {size} bytes of {6 * MiB}")
    ratio = speed / limit
    assert 0.6 <= ratio <= 1.5, (
        f"SetLimit {limit} B/s on pid {pid}: curl averaged {speed:.0f} B/s over {secs:.2f} s "
        f"(ratio {ratio:.2f}, want 0.6..1.5)")


def test_unit_limit_holds_a_real_transfer(machine, web):
    m = machine
    ensure_running(m)
    limit = MiB
    start_download(m, "ct-dl-unit", "6M", "--max-time", "30")
    must(call(m, "SetUnitLimit", "string:ct-dl-unit.service", f"uint64:{limit}", "uint64:0"),
         "SetUnitLimit")
    size, secs, speed = finish_download(m, "ct-dl-unit", timeout=40)
    if size != 6 * MiB:
        raise MachineError(f"curl got {size} bytes of {6 * MiB}")
    ratio = speed / limit
    assert 0.6 <= ratio <= 1.5, (
        f"SetUnitLimit {limit} B/s on ct-dl-unit.service: curl averaged {speed:.0f} B/s over "
        f"{secs:.2f} s (ratio {ratio:.2f}, want 0.6..1.5)")


# ---- 4. the 5 s diagnostics in the journal -----------------------------------------------------

RATE_FIELDS = ("PID", "COMM", "CGROUP", "DIRECTION", "KIND", "RATE", "LIMIT", "RATIO", "STATUS")
EBPF_FIELDS = ("PID", "COMM", "CGROUP", "DIRECTION", "KIND", "STATUS", "PROGRAM_CALLS",
               "PACKETS", "DROPPED", "BYTES", "BYTES_DROPPED")
STATUSES = {names.STATUS_THROTTLED, names.STATUS_NOT_WORKING, names.STATUS_PROGRAM_NOT_CALLED,
            names.STATUS_NOT_DROPPING}


def _diag_entries(m: Machine, cur: str, match: str) -> list[dict]:
    """The daemon's entries after the cursor that have the field ``match`` (FIELD=value).
    Filtered here: journalctl 252 with --after-cursor and a match skips the first matching
    entry after the cursor."""
    field, _, value = match.partition("=")
    out = journal_after(m, cur, f"-u {UNIT} -o json")
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in entries if e.get(field) == value]


def _wait_reports(m: Machine, cur: str, what: str, match: str, kind: str) -> list[dict]:
    """Waits for two reports of ``kind``; returns every entry of ``match`` since ``cur``."""
    F = names.JOURNAL_FIELD_PREFIX
    try:
        m.wait_for(what, lambda: len([e for e in _diag_entries(m, cur, match)
                                      if e.get(F + "KIND") == kind]) >= 2,
                   timeout=20, interval=1.0)
    except AssertionError as e:
        raise AssertionError(f"{e}; the daemon's journal meanwhile:\n"
                             + journal_after(m, cur, f"-u {UNIT} -o cat")) from None
    return _diag_entries(m, cur, match)


def _five_seconds_apart(entries: list[dict]) -> None:
    gap = (int(entries[1]["__REALTIME_TIMESTAMP"]) - int(entries[0]["__REALTIME_TIMESTAMP"])) / 1e6
    assert 4.0 <= gap <= 6.5, f"reports {gap:.1f} s apart, want every 5 s"


def test_journal_has_the_5s_diagnostics(machine):
    """Every 5 s the daemon reports its limits to the journal with CHADTHROTTLE_* fields; a
    limit whose process moves nothing is counted in an ``idle`` line."""
    m = machine
    ensure_running(m)
    F = names.JOURNAL_FIELD_PREFIX
    m.run("systemd-run --quiet --unit=ct-idle -p Type=exec -p CollectMode=inactive-or-failed "
          "sleep infinity")
    try:
        pid = int(show(m, "MainPID", unit="ct-idle")["MainPID"])
        cur = cursor(m)
        must(call(m, "SetLimit", f"uint32:{pid}", f"uint64:{100 * KiB}", "uint64:0"), "SetLimit")
        got = _wait_reports(m, cur, "two 5 s reports of the idle limit", f"{F}KIND=idle", "idle")
    finally:
        m.run("systemctl stop ct-idle", check=False)
    idle = [e for e in got if e.get(F + "KIND") == "idle"]
    for e in idle:
        assert e["_SYSTEMD_UNIT"] == f"{UNIT}.service" and e["SYSLOG_IDENTIFIER"] == UNIT, e
        assert int(e[F + "IDLE_LIMITS"]) >= 1, e
        assert re.match(r"\d+ limited process\(es\) idle", e["MESSAGE"]), e["MESSAGE"]
    _five_seconds_apart(idle)


def test_journal_reports_a_limited_transfer_with_its_fields(machine, web):
    m = machine
    ensure_running(m)
    F = names.JOURNAL_FIELD_PREFIX
    limit = 100 * KiB
    # curl paces itself too (150 KB/s, 14 s at most): the transfer lasts long enough for two
    # reports whatever the limiter does
    pid = start_download(m, "ct-dl-diag", "64M", "--limit-rate", "150k", "--max-time", "14")
    cur = cursor(m)
    must(call(m, "SetLimit", f"uint32:{pid}", f"uint64:{limit}", "uint64:0"), "SetLimit")
    m.run(f"touch {CT}/ct-dl-diag.go")
    try:
        got = _wait_reports(m, cur, f"two diagnostics reports for pid {pid}", f"{F}PID={pid}",
                            "rate")
    finally:
        m.run("systemctl stop ct-dl-diag", check=False)
    rates = [e for e in got if e.get(F + "KIND") == "rate"]
    ebpf = [e for e in got if e.get(F + "KIND") == "ebpf"]
    assert ebpf, "no 'eBPF stats' line with CHADTHROTTLE_KIND=ebpf:\n" + json.dumps(got)[:3000]
    for e, fields in [(rates[0], RATE_FIELDS), (ebpf[0], EBPF_FIELDS)]:
        missing = [f for f in fields if F + f not in e]
        assert not missing, f"journal entry lacks {missing}: {e.get('MESSAGE')!r}"
    r = rates[0]
    assert r[F + "PID"] == str(pid) and r[F + "DIRECTION"] == "download"
    assert r[F + "LIMIT"] == str(limit)
    assert r[F + "STATUS"] in STATUSES, r[F + "STATUS"]
    assert re.match(rf"PID {pid} \(\S+\) download: actual=[\d.]+ [KMG]B/s, limit=100\.0 KB/s, "
                    r"ratio=[\d.]+x ", r["MESSAGE"]), r["MESSAGE"]
    assert r["SYSLOG_IDENTIFIER"] == UNIT and r["_SYSTEMD_UNIT"] == f"{UNIT}.service"
    _five_seconds_apart(rates)


# ---- 5. stop detaches everything ---------------------------------------------------------------

def test_stop_detaches_every_program_qdisc_and_device(machine, web):
    m = machine
    main = ensure_running(m)
    m.run("systemd-run --quiet --unit=ct-hold -p Type=exec -p CollectMode=inactive-or-failed "
          "sleep infinity")
    try:
        hold = int(show(m, "MainPID", unit="ct-hold")["MainPID"])
        must(call(m, "SetLimit", f"uint32:{hold}", f"uint64:{MiB}", f"uint64:{MiB}"), "SetLimit")
        must(call(m, "SetUnitLimit", "string:ct-hold.service", f"uint64:{MiB}", "uint64:0"),
             "SetUnitLimit")
        ids = daemon_bpf_ids(m, main)
        assert ids["link_id"] and ids["prog_id"], f"the daemon holds no BPF program/link: {ids}"
        ours = {i: a for i, a in cgroup_attached(m).items() if i in ids["prog_id"]}
        assert any("/ct-hold.service" in a for a in ours.values()), (
            f"nothing of the daemon's attached to ct-hold.service: {cgroup_attached(m)}")

        r = m.run(f"systemctl stop {UNIT}", check=False, timeout=30)
        assert r.ok, f"systemctl stop failed:\n{r}"
        st = show(m, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
        assert st["ActiveState"] == "inactive" and st["Result"] == "success", st
        assert st["ExecMainStatus"] == "0", f"SIGTERM must end the daemon with 0: {st}"

        def gone() -> bool:
            progs = [i for i in ids["prog_id"]
                     if m.run(f"bpftool prog show id {i}", check=False).ok]
            links = [i for i in ids["link_id"]
                     if m.run(f"bpftool link show id {i}", check=False).ok]
            return not progs and not links

        try:
            m.wait_for("the daemon's programs and links to be freed", gone, timeout=10)
        except AssertionError as e:
            raise AssertionError(f"{e}: still loaded after stop:\n"
                                 + m.run("bpftool prog; bpftool link", check=False).out) from None
        left = {i: a for i, a in cgroup_attached(m).items() if i in ids["prog_id"]}
        assert not left, f"still attached after stop: {left}"
        now = m.network_state()
        assert now == m.baseline, (
            f"qdiscs/devices differ after stop:\nbefore: {m.baseline}\nafter:  {now}")
    finally:
        m.run("systemctl stop ct-hold", check=False)


# ---- 6. the watchdog restarts a hung daemon ----------------------------------------------------

def test_watchdog_restarts_a_hung_daemon(machine):
    m = machine
    dropin(m, "50-test-watchdog", "WatchdogSec=3s\n")  # the unit ships 30 s
    try:
        m.run(f"systemctl reset-failed {UNIT}", check=False)
        m.run(f"systemctl restart {UNIT}")
        pid = wait_ready(m)
        assert show(m, "WatchdogUSec")["WatchdogUSec"] == "3s"
        time.sleep(4.5)  # longer than WatchdogSec: alive only if it pings
        assert is_ready(m) and show(m, "MainPID")["MainPID"] == str(pid), (
            "the daemon does not ping the watchdog (killed within WatchdogSec while healthy)")
        restarts = int(show(m, "NRestarts")["NRestarts"])
        cur = cursor(m)
        m.run(f"kill -STOP {pid}")
        new = wait_ready(m, timeout=30, not_pid=pid)
        log = journal_after(m, cur, f"-u {UNIT} -o cat")
        assert "Watchdog timeout" in log, log
        assert int(show(m, "NRestarts")["NRestarts"]) == restarts + 1
        assert new != pid
    finally:
        remove_dropin(m, "50-test-watchdog")
        m.run(f"systemctl reset-failed {UNIT}; systemctl restart {UNIT}", check=False)


# ---- 7. kill -9: Restart=on-failure ------------------------------------------------------------

def test_kill9_is_restarted(machine):
    m = machine
    pid = ensure_running(m)
    restarts = int(show(m, "NRestarts")["NRestarts"])
    cur = cursor(m)
    m.run(f"kill -9 {pid}")
    new = wait_ready(m, timeout=20, not_pid=pid)
    log = journal_after(m, cur, f"-u {UNIT} -o cat")
    assert "status=9/KILL" in log and "Scheduled restart job" in log, log
    assert int(show(m, "NRestarts")["NRestarts"]) == restarts + 1
    assert call(m, "ListLimits").ok, "the restarted daemon does not answer"
    assert new != pid


def test_kill9_brings_every_limit_back(machine):
    m = machine
    pid = ensure_running(m)
    m.run("systemd-run --quiet --unit=ct-persist -p Type=exec -p CollectMode=inactive-or-failed "
          "sleep infinity")
    try:
        target = int(show(m, "MainPID", unit="ct-persist")["MainPID"])
        must(call(m, "SetLimit", f"uint32:{target}", "uint64:307200", "uint64:65536"),
             "SetLimit")
        m.run(f"kill -9 {pid}")
        wait_ready(m, timeout=20, not_pid=pid)
        r = must(call(m, "ListLimits"), "ListLimits")
        assert re.search(rf"uint32 {target}\s+uint64 307200\s+uint64 65536", r.out), (
            f"the limit of pid {target} did not come back after the restart:\n{r.out}")
    finally:
        m.run("systemctl stop ct-persist", check=False)


def test_state_and_rule_files_are_written_inside_the_sandbox(machine):
    """Under the unit's ProtectSystem=strict, SetLimit's entry lands in /run/chadthrottle and
    a permanent rule in /etc/chadthrottle/rules.d (a read-only file system there would lose
    both at the next restart), and the state dir outlives a restart of the unit."""
    m = machine
    ensure_running(m)
    m.run("systemd-run --quiet --unit=ct-files -p Type=exec -p CollectMode=inactive-or-failed "
          "sleep infinity")
    cur = cursor(m)
    try:
        target = int(show(m, "MainPID", unit="ct-files")["MainPID"])
        must(call(m, "SetLimit", f"uint32:{target}", "uint64:307200", "uint64:0"), "SetLimit")
        r = m.run("chadthrottlectl rule add --name ct-files-xyz -d 50K --permanent "
                  "--id ct-files", check=False)
        assert r.ok, f"a permanent rule could not be added:\n{r}"
        files = m.run("ls -1 /run/chadthrottle/limits /etc/chadthrottle/rules.d").out
        assert f"{target}.json" in files and "ct-files.toml" in files, files
        m.run(f"systemctl restart {UNIT}")
        wait_ready(m)
        assert f"{target}.json" in m.run("ls -1 /run/chadthrottle/limits").out
        r = must(call(m, "ListLimits"), "ListLimits")
        assert re.search(rf"uint32 {target}\s+uint64 307200", r.out), r.out
        log = journal_after(m, cur)
        assert "Read-only file system" not in log, log
    finally:
        m.run("chadthrottlectl rule remove ct-files", check=False)
        m.run("systemctl stop ct-files", check=False)


# ---- 8. systemctl reload -----------------------------------------------------------------------

def test_reload_rereads_the_rules_and_the_daemon_stays(machine):
    """systemctl reload sends SIGHUP; the daemon re-reads /etc/chadthrottle/rules.d and keeps
    running (same main pid, limits in place)."""
    m = machine
    pid = ensure_running(m)
    assert "kill" in show(m, "ExecReload")["ExecReload"], "the unit has no ExecReload="
    m.run("mkdir -p /etc/chadthrottle/rules.d")
    m.write("/etc/chadthrottle/rules.d/ct-reload.toml",
            'name = "reload check"\ncomm = "ct-reload-xyz"\ndownload = 51200\n')
    try:
        cur = cursor(m)
        r = m.run(f"systemctl reload {UNIT}", check=False)
        assert r.ok, f"systemctl reload failed:\n{r}"
        m.wait_for("'rules reloaded' in the journal",
                   lambda: "rules reloaded" in journal_after(m, cur), timeout=10)
        rules = must(call(m, "ListRules"), "ListRules").out
        assert "ct-reload" in rules and "ct-reload-xyz" in rules, rules
        time.sleep(1)
        assert is_ready(m) and show(m, "MainPID")["MainPID"] == str(pid), (
            "the daemon did not survive SIGHUP:\n" + journal_after(m, cur, f"-u {UNIT} -o cat"))
    finally:
        m.run("rm -f /etc/chadthrottle/rules.d/ct-reload.toml && "
              f"systemctl reload {UNIT}", check=False)


# ---- a daemon that cannot start gives up -------------------------------------------------------

def test_a_daemon_that_cannot_start_gives_up(machine):
    """Without libbpf the daemon exits 1 at once; the unit's start limit ends the loop."""
    m = machine
    m.run(f"systemctl stop {UNIT}", check=False)
    dropin(m, "50-test-nolibbpf", "Environment=CHADTHROTTLE_LIBBPF=/nonexistent/libbpf.so.1\n")
    try:
        m.run(f"systemctl reset-failed {UNIT}", check=False)
        cur = cursor(m)
        m.run(f"systemctl start {UNIT}", check=False)

        def gave_up() -> bool:
            return "Start request repeated too quickly" in journal_after(m, cur)

        try:
            m.wait_for("the start limit to stop the restart loop", gave_up, timeout=40,
                       interval=0.5)
        except AssertionError as e:
            st = show(m, "ActiveState", "Result", "NRestarts")
            raise AssertionError(f"{e}: still restarting: {st}") from None
        st = show(m, "ActiveState", "NRestarts")
        assert st["ActiveState"] == "failed", st
        time.sleep(4)  # two RestartSec= later: no further attempt
        assert show(m, "ActiveState", "NRestarts") == st, "it goes on restarting"
        assert int(st["NRestarts"]) <= 5, st
    finally:
        remove_dropin(m, "50-test-nolibbpf")
        m.run(f"systemctl reset-failed {UNIT}", check=False)


# ---- 9. the hardening is in force --------------------------------------------------------------

def test_hardening_is_in_force_on_the_running_unit(machine, request):
    m = machine
    pid = ensure_running(m)
    r = m.run(f"systemd-analyze security {UNIT} --no-pager", check=False)
    found = re.search(r"Overall exposure level for chadthrottled\.service: ([0-9.]+) (\w+)",
                      r.out)
    assert found, f"no exposure figure:\n{r}"
    exposure = float(found.group(1))
    _say(request, f"systemd-analyze security {UNIT} (running): exposure {exposure} "
                  f"{found.group(2)}")
    assert exposure <= EXPOSURE_MAX, (
        f"exposure {exposure} > {EXPOSURE_MAX}:\n"
        + "\n".join(ln for ln in r.out.splitlines() if ln.startswith("✗")))
    status = m.run(f"cat /proc/{pid}/status").out
    fields = dict(ln.split(":", 1) for ln in status.splitlines() if ":" in ln)
    assert int(fields["CapBnd"], 16) == UNIT_CAPS, f"CapBnd {fields['CapBnd'].strip()}"
    assert int(fields["CapEff"], 16) & ~UNIT_CAPS == 0, f"CapEff {fields['CapEff'].strip()}"
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2", "SystemCallFilter= is not applied"
    root = m.run(f"findmnt --task {pid} -n -o OPTIONS --target /usr").out
    assert root.split(",")[0] == "ro", f"ProtectSystem=strict: /usr must be read-only: {root}"
