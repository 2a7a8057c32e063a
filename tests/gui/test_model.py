"""The applet's plain-Python parts, without a display: grouping rows into applications,
history, filters, the log slider, the wording, permissions, preferences; and that the applet
is a bus client only (it imports nothing of the engine, the service or the server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chadthrottle.cli import render
from chadthrottle.gui import access, sliders, text
from chadthrottle.gui.model import FORGET_AFTER, HISTORY, Model, visible
from chadthrottle.gui.prefs import Prefs
from chadthrottle.names import RATE_MAX, RATE_MIN
from chadthrottle.units import check_rate, format_limit, parse_rate

from .desktop import SRC, SYSTEM_PYTHON

MiB = 1024 * 1024


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def row(pid: int, comm: str, down: float = 0.0, up: float = 0.0, **extra) -> dict:
    return {"pid": pid, "comm": comm, "download_rate": down, "upload_rate": up, **extra}


def model(clock: Clock | None = None) -> Model:
    return Model(clock=clock or Clock(), uid_lookup=lambda pid: 1000 + pid % 2)


# --- grouping --------------------------------------------------------------------------------
def test_rows_group_by_exe_and_fall_back_to_comm():
    m = model()
    ch = m.update([
        row(10, "firefox", 5e6, exe="/usr/lib/firefox/firefox"),
        row(11, "Web Content", 1e6, exe="/usr/lib/firefox/firefox"),
        row(20, "curl", 2e6),  # today's daemon: no exe
        row(21, "curl", 1e6),
    ])
    assert {a.key for a in ch.added_apps} == {"exe:/usr/lib/firefox/firefox", "comm:curl"}
    ff = m.apps["exe:/usr/lib/firefox/firefox"]
    assert ff.name == "firefox" and set(ff.procs) == {10, 11}
    assert ff.download_rate == 6e6
    assert set(m.apps["comm:curl"].procs) == {20, 21}
    assert [a.name for a in m.sorted_apps()] == ["firefox", "curl"]
    assert m.total_download == 9e6


def test_absent_and_broken_keys_are_harmless():
    m = model()
    m.update([{"pid": 7}, {"pid": "x"}, {"comm": "no pid"}, {"pid": 0},
              {"pid": 8, "download_rate": None, "download_bytes": -5, "status": None}])
    assert set(m.procs) == {7, 8}
    p = m.procs[8]
    assert (p.download_rate, p.download_bytes, p.status, p.exe, p.unit) == (0.0, 0, "", "", "")
    assert p.uid == 1000  # from the owner of /proc/8 when the row has no uid
    assert m.procs[7].name == "PID 7"


def test_uid_unit_and_rule_from_the_row_when_present():
    m = model()
    m.update([row(5, "sshd", uid=0, unit="ssh.service", rule="r1", cgroup="/system.slice")])
    p = m.procs[5]
    assert (p.uid, p.user, p.unit, p.rule, p.unit_target) == (0, "root", "ssh.service", "r1",
                                                               "ssh.service")
    m.update([row(6, "bash", cgroup="/")])
    assert m.procs[6].unit_target == ""  # the cgroup2 root would be the whole machine
    m.update([row(6, "bash", cgroup="/user.slice/user-1000.slice/session-2.scope")])
    assert m.procs[6].unit_target == "/user.slice/user-1000.slice/session-2.scope"


def test_an_exec_moves_the_process_to_its_new_application():
    m = model()
    m.update([row(30, "sh", 1.0)])
    ch = m.update([row(30, "curl", 1.0)])
    assert [(p.pid, old) for p, old in ch.moved_procs] == [(30, "comm:sh")]
    assert [a.key for a in ch.removed_apps] == ["comm:sh"]
    assert set(m.apps) == {"comm:curl"}


def test_history_is_sixty_samples_and_idle_processes_are_kept_then_forgotten():
    clock = Clock()
    m = model(clock)
    for i in range(HISTORY + 15):
        clock.t += 1
        m.update([row(1, "a", float(i), 1.0), row(2, "b", 0.0, 0.0, download_limit=MiB)])
    a = m.apps["comm:a"]
    assert len(a.history) == HISTORY and a.history[-1] == (HISTORY + 14.0, 1.0)
    assert len(m.procs[1].history) == HISTORY
    # pid 1 stops moving bytes: listed at zero rate, then forgotten; pid 2 is limited: kept
    clock.t += 1
    m.update([])
    assert m.procs[1].rate == 0 and m.procs[1].history[-1] == (0.0, 0.0)
    clock.t += FORGET_AFTER + 1
    ch = m.update([])
    assert [p.pid for p in ch.removed_procs] == [1]
    assert set(m.procs) == {2}


def test_a_new_application_history_is_aligned_with_the_others():
    m = model()
    for _ in range(5):
        m.update([row(1, "a", 1.0)])
    m.update([row(1, "a", 1.0), row(2, "b", 3.0)])
    assert len(m.apps["comm:b"].history) == len(m.apps["comm:a"].history) == 6
    assert list(m.apps["comm:b"].history)[-2:] == [(0.0, 0.0), (3.0, 0.0)]


def test_exit_removes_the_process_and_an_empty_application():
    m = model()
    m.update([row(40, "wget", 1.0, download_limit=50_000)])
    ch = m.remove_process(40)
    assert [p.pid for p in ch.removed_procs] == [40] and [a.key for a in ch.removed_apps] == [
        "comm:wget"]
    assert m.remove_process(40).removed_procs == []


def test_limits_status_and_users_of_an_application():
    m = model()
    m.update([row(1, "x", status="throttled", download_limit=MiB, uid=0),
              row(2, "x", status="not-working", download_limit=MiB, uid=1000)])
    app = m.apps["comm:x"]
    assert app.common_limit == (MiB, 0) and app.limited_count == 2
    assert app.status == "not-working"  # the worst one shows
    assert app.user == "2 users"
    assert m.set_limit(2, 0, 0) is not None
    assert app.common_limit is None and app.limited_count == 1


def test_accessible_names_carry_the_name_and_the_pid():
    m = model()
    m.update([row(1234, "curl", 1.0), row(1235, "curl", 1.0)])
    assert m.procs[1234].accessible_name == "curl (PID 1234)"
    assert m.apps["comm:curl"].accessible_name == "curl (application, 2 processes)"


def test_filters_active_only_search_and_collapse():
    m = model()
    m.update([row(1, "curl", 5.0), row(2, "curl", 0.0), row(3, "idle", 0.0)])
    curl, idle = m.apps["comm:curl"], m.apps["comm:idle"]
    p1, p2 = m.procs[1], m.procs[2]

    def show(app, proc, q="", active=False, expanded=True):
        return visible(app, proc, query=q, active_only=active, expanded=expanded)

    assert show(curl, None) and show(idle, None)
    assert not show(idle, None, active=True)
    assert show(curl, p1, active=True) and not show(curl, p2, active=True)
    assert not show(curl, p1, expanded=False)
    assert show(curl, None, q="CURL") and not show(idle, None, q="curl")
    assert show(curl, None, q="2") and show(curl, p2, q="2") and not show(curl, p1, q="2")
    assert show(curl, p1, q="curl 1")  # every word must match


# --- the slider ------------------------------------------------------------------------------
def test_presets_sit_on_the_slider_and_read_back_exactly():
    assert [r for _, r in sliders.PRESETS] == [256 * 1024, MiB, 5 * MiB, 0]
    for label, rate in sliders.PRESETS:
        if rate:
            assert sliders.position_to_rate(sliders.rate_to_position(rate)) == rate
            assert format_limit(rate) == label
    assert sliders.rate_to_position(0) == sliders.LOG_UNLIMITED
    assert sliders.position_to_rate(sliders.LOG_UNLIMITED) == 0
    assert sliders.position_to_rate(sliders.LOG_MIN) == RATE_MIN
    assert sliders.rate_to_position(RATE_MAX) == sliders.LOG_MAX


@given(st.floats(min_value=sliders.LOG_MIN - 1, max_value=sliders.LOG_UNLIMITED + 1,
                 allow_nan=False))
def test_every_slider_position_is_a_valid_limit_written_exactly(pos):
    rate = sliders.position_to_rate(pos)
    assert check_rate(rate) == rate
    assert parse_rate(format_limit(rate)) == rate
    if rate:  # monotonic and close to the position's own rate
        assert abs(sliders.rate_to_position(rate) - min(max(pos, 10), 30)) <= 0.1


# --- wording, permissions, preferences -------------------------------------------------------
@pytest.mark.parametrize(("d", "u"), [(0, 0), (50_000, 0), (MiB, 5 * MiB), (1024, 1 << 40)])
def test_limits_are_worded_as_the_cli_words_them(d, u):
    assert text.limits_summary(d, u) == render.limits_summary(d, u)
    assert text.limited_message("PID 9 (wget)", 50_000, 0) == \
        "Limited PID 9 (wget): download 50 KB/s, upload unlimited"
    assert text.limits_short(MiB, 0) == "↓ 1 MiB/s  ↑ —"


def test_error_explanations():
    assert "sudo systemctl start chadthrottled" in text.explain(
        "org.freedesktop.DBus.Error.ServiceUnknown")
    assert "org.chadthrottle.throttle.limit-any" in text.explain(
        "org.chadthrottle.Throttle1.Error.NotAuthorized", "uid 1000")
    assert text.explain("x.Y", "why") == "why [x.Y]"


def test_permissions_answers():
    perms = {text.ACTION_LIMIT_OWN: "yes", text.ACTION_LIMIT_ANY: "auth",
             text.ACTION_MANAGE_RULES: "no"}
    m = model()
    m.update([row(1, "mine", uid=1000), row(2, "theirs", uid=0)])
    mine, theirs = m.procs[1], m.procs[2]
    assert access.process_access(perms, mine, 1000) == ("yes", "")
    a, why = access.process_access(perms, theirs, 1000)
    assert a == "auth" and "password" in why and text.ACTION_LIMIT_ANY in why
    a, why = access.rules_access(perms, True)
    assert a == "no" and "Not allowed" in why
    assert access.rules_access(perms, False)[0] == "no"
    assert access.process_access(None, theirs, 1000)[0] == "yes"  # no GetPermissions
    assert access.answer({"a": "maybe"}, "a") == "no"
    assert access.best(["no", "auth"]) == "auth" and access.best([]) == "no"


def test_preferences_default_persist_and_survive_a_broken_file(tmp_path):
    path = tmp_path / "gui.json"
    p = Prefs(path)
    assert p["notifications"] is False and p["active_only"] is False
    p.set("notifications", True)
    assert Prefs(path)["notifications"] is True
    path.write_text("{not json")
    assert Prefs(path)["notifications"] is False
    path.write_text('{"notifications": "yes", "other": 1}')
    q = Prefs(path)
    assert q["notifications"] is False and q["other"] == 1


# --- a bus client only -----------------------------------------------------------------------
def test_the_applet_is_a_bus_client_only():
    """DESIGN §4 and issue 10: the applet imports nothing of the engine, the service or the
    server (nor the CLI's dbus-fast client): Gio is its only way to the daemon."""
    code = ("import sys, chadthrottle.gui.app, chadthrottle.gui.window, chadthrottle.gui.editor,"
            " chadthrottle.gui.limits_page, chadthrottle.gui.snapshot, chadthrottle.gui.tray; "
            "print(sorted(m for m in sys.modules if m.startswith(('chadthrottle', 'dbus'))))")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("DISPLAY", None)
    out = subprocess.run([SYSTEM_PYTHON, "-c", code], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert "chadthrottle.gui.bus" in out
    for forbidden in ("chadthrottle.engine", "chadthrottle.service", "chadthrottle.server",
                      "chadthrottle.libbpf", "chadthrottle.bpfobject", "chadthrottle.cli",
                      "chadthrottle.procfs", "'dbus_fast", "'dbus'"):
        assert forbidden not in out, out


def test_the_entry_point_moves_to_the_system_interpreter():
    """chadthrottle-gui started from the venv (no gi there) runs on /usr/bin/python3."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    env.pop("DISPLAY", None)
    p = subprocess.run([sys.executable, "-m", "chadthrottle.gui.launcher", "--help"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Usage:" in p.stdout and "chadthrottle-gui" in p.stdout
    assert Path(SYSTEM_PYTHON).exists()
