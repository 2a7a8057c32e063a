"""The user-space matcher and the facts it reads from /proc, on real processes; what the
kernel can decide of a rule (issue 9)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from chadthrottle.cgroups import cgroup2_mount
from chadthrottle.procfs import terminate
from chadthrottle.rules import procinfo
from chadthrottle.rules.match import (
    ProcessFacts,
    best_rule,
    exe_files,
    kernel_keys,
    match_all,
    matches,
    unit_matches,
    user_space_rules,
    watch_dirs,
)
from chadthrottle.rules.model import Rule
from chadthrottle.rules.ruleset import RuleSet

SLEEP = os.path.realpath(shutil.which("sleep") or "/bin/sleep")


def rule(rid: str, **keys) -> Rule:
    return Rule.from_bus({"download": 51200, **keys, "id": rid})


def facts(**over) -> ProcessFacts:
    base = dict(pid=4242, start_time=1, exe="/usr/bin/wget", comm="wget",
                cmdline="wget -q http://example.invalid/big", uid=1000,
                cgroup="/user.slice/user-1000.slice/session-2.scope")
    return ProcessFacts(**{**base, **over})


@contextmanager
def running(argv: list[str]) -> Iterator[subprocess.Popen]:
    """A real process (exec done when Popen returns); ended by its pid afterwards."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        terminate(proc)


def copy_of_sleep(directory: Path, name: str = "sleep") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    shutil.copy2(SLEEP, target)
    return target


# --- pure matching ----------------------------------------------------------------------------
@pytest.mark.parametrize(("unit", "cgroup", "expected"), [
    ("backup.service", "/system.slice/backup.service", True),
    ("backup.service", "/system.slice/backup.service/worker", True),
    ("backup.service", "/system.slice/backup.service2", False),
    ("backup.service", "/user.slice/user@1000.service/app.slice/backup.service", True),
    ("system.slice", "/system.slice/backup.service", True),
    ("/system.slice/backup.service", "/system.slice/backup.service", True),
    ("/system.slice/backup.service", "/system.slice/backup.service/sub", True),
    ("/system.slice/backup.service", "/system.slice/backup.service2", False),
    ("/system.slice/backup.service", "/user.slice/system.slice/backup.service", False),
    ("system.slice/backup.service", "/system.slice/backup.service", True),
    ("backup.service", "", False),
    ("/system.slice", "/", False),
])
def test_unit_matches_itself_and_below_on_component_boundaries(unit, cgroup, expected) -> None:
    assert unit_matches(unit, cgroup) is expected


def test_every_key_given_must_hold() -> None:
    f = facts()
    assert matches(rule("a", comm="wget"), f)
    assert matches(rule("a", comm="wget", uid=1000, exe="/usr/bin/*", unit="session-2.scope",
                        cmdline=r"-q\b"), f)
    assert not matches(rule("a", comm="wget", uid=1001), f)
    assert not matches(rule("a", comm="wge"), f)
    assert not matches(rule("a", exe="/usr/bin/wget2"), f)
    assert not matches(rule("a", unit="other.scope"), f)
    assert matches(rule("a", cmdline="example"), f)  # searched, not anchored
    assert not matches(rule("a", cmdline="^example"), f)


def test_best_rule_follows_the_precedence_and_skips_disabled_rules() -> None:
    rules = RuleSet([
        rule("by-user", uid=1000),
        rule("by-glob", exe="/usr/bin/*"),
        rule("by-path", exe="/usr/bin/wget"),
        rule("by-path-and-user", exe="/usr/bin/wget", uid=1000, enabled=False),
    ])
    assert best_rule(facts(), rules).id == "by-path"
    assert best_rule(facts(), list(rules.values())).id == "by-path"
    assert best_rule(facts(exe="/usr/bin/curl"), rules).id == "by-glob"
    assert best_rule(facts(exe="/opt/x"), rules).id == "by-user"
    assert best_rule(facts(exe="/opt/x", uid=0), rules) is None
    enabled = rules.put(rule("by-path-and-user", exe="/usr/bin/wget", uid=1000))
    assert best_rule(facts(), enabled).id == "by-path-and-user"


def test_pid_1_and_exempt_pids_are_never_matched() -> None:
    rules = [rule("all-root", uid=0)]
    assert best_rule(facts(pid=1, uid=0), rules) is None
    assert best_rule(facts(pid=77, uid=0), rules, exempt={77}) is None
    assert best_rule(facts(pid=78, uid=0), rules, exempt={77}).id == "all-root"
    found = match_all([facts(pid=1, uid=0), facts(pid=5, uid=0), facts(pid=6, uid=1)], rules)
    assert {pid: r.id for pid, r in found.items()} == {5: "all-root"}


# --- real processes ---------------------------------------------------------------------------
def test_a_copied_binary_is_matched_by_path_and_the_same_program_elsewhere_is_not(
        tmp_path: Path) -> None:
    copy = copy_of_sleep(tmp_path / "apps")
    rules = RuleSet([rule("copy", exe=str(copy))])
    inodes = {"copy": kernel_keys(rules["copy"]).exe_files}
    with running([str(copy), "60"]) as mine, running([SLEEP, "60"]) as other:
        f_mine, f_other = procinfo.read_facts(mine.pid), procinfo.read_facts(other.pid)
        assert f_mine is not None and f_other is not None
        assert (f_mine.exe, f_other.exe) == (str(copy), SLEEP)
        assert f_mine.comm == "sleep" and f_mine.cmdline == f"{copy} 60"
        assert f_mine.uid == os.getuid()
        assert f_mine.exe_id in inodes["copy"]
        for kw in ({}, {"inodes": inodes}):
            assert best_rule(f_mine, rules, **kw).id == "copy"
            assert best_rule(f_other, rules, **kw) is None
        found = match_all(procinfo.iter_facts(), rules)
        assert found.get(mine.pid) is not None and other.pid not in found


def test_a_replaced_binary_still_matches_its_path(tmp_path: Path) -> None:
    """A package upgrade renames a new file over the old one: the running process shows
    '<path> (deleted)', and the rule on the path must still match it."""
    prog = copy_of_sleep(tmp_path / "bin", "prog")
    r = rule("prog", exe=str(prog))
    with running([str(prog), "60"]) as p:
        before = kernel_keys(r)
        new = tmp_path / "bin" / ".prog.dpkg-new"
        shutil.copy2(SLEEP, new)
        os.replace(new, prog)  # what dpkg does
        assert os.readlink(f"/proc/{p.pid}/exe") == f"{prog} (deleted)"
        f = procinfo.read_facts(p.pid)
        assert f is not None and f.exe == str(prog)
        assert best_rule(f, [r]).id == "prog"
        after = kernel_keys(r)
        assert after.exe_files != before.exe_files  # the kernel learns the new file
        assert str(tmp_path / "bin") in after.watch_dirs  # where the rename is seen
        assert best_rule(f, [r], inodes={"prog": after.exe_files}).id == "prog"


def test_a_file_really_named_deleted_keeps_its_name(tmp_path: Path) -> None:
    odd = copy_of_sleep(tmp_path / "odd", "x (deleted)")
    with running([str(odd), "60"]) as p:
        f = procinfo.read_facts(p.pid)
        assert f is not None and f.exe == str(odd)
        assert best_rule(f, [rule("x", exe=str(odd))]).id == "x"
        assert best_rule(f, [rule("x", exe=str(odd.parent / "x"))]) is None


def test_a_rule_on_a_symbolic_link_matches_through_the_kernel_files(tmp_path: Path) -> None:
    target = copy_of_sleep(tmp_path / "real")
    link = tmp_path / "links" / "sleep"
    link.parent.mkdir()
    link.symlink_to(target)
    r = rule("link", exe=str(link))
    keys = kernel_keys(r)
    assert {str(tmp_path / "links"), str(tmp_path / "real")} <= keys.watch_dirs
    with running([str(link), "60"]) as p:
        f = procinfo.read_facts(p.pid)
        assert f is not None and f.exe == str(target)
        assert best_rule(f, [r]) is None  # by path alone: the kernel reports the target
        assert best_rule(f, [r], inodes={"link": keys.exe_files}).id == "link"


def test_cmdline_and_comm_rules_on_real_processes(tmp_path: Path) -> None:
    named = copy_of_sleep(tmp_path / "n", "ct-test-sleeper")
    rules = RuleSet([rule("args", cmdline=r"sleep 61\.5$"), rule("name", comm="ct-test-sleep")])
    with running([SLEEP, "61.5"]) as a, running([str(named), "60"]) as b, \
            running([SLEEP, "61"]) as c:
        got = {pid: best_rule(procinfo.read_facts(pid), rules) for pid in (a.pid, b.pid, c.pid)}
        assert got[a.pid].id == "args"
        assert got[b.pid] is None  # comm is exact: 'ct-test-sleep' is not 'ct-test-sleeper'
        assert got[c.pid] is None
        f = procinfo.read_facts(b.pid)
        assert f.comm == "ct-test-sleeper"  # 15 bytes: the kernel's whole name
        assert best_rule(f, [rule("name", comm="ct-test-sleeper")]).id == "name"


@contextmanager
def own_cgroup(name: str) -> Iterator[tuple[Path, str]]:
    """A real cgroup below the cgroup2 mount (root only); removed afterwards."""
    try:
        mount = cgroup2_mount()
    except Exception as e:  # noqa: BLE001 - no cgroup2 here
        pytest.skip(f"no cgroup2 mount: {e}")
    if os.geteuid() != 0:
        pytest.skip("creating a cgroup needs root")
    path = mount / name
    path.mkdir()
    try:
        yield path, "/" + name
    finally:
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # back to the root, then the dir can go
                (mount / "cgroup.procs").write_text(pid)
        path.rmdir()


def test_unit_rule_matches_a_process_in_a_real_cgroup() -> None:
    unit = f"ct-rules-{uuid.uuid4().hex[:8]}.service"
    with own_cgroup(unit) as (path, rel), running([SLEEP, "60"]) as p:
        (path / "cgroup.procs").write_text(str(p.pid))
        f = procinfo.read_facts(p.pid)
        assert f is not None and f.cgroup == rel
        assert best_rule(f, [rule("by-name", unit=unit)]).id == "by-name"
        assert best_rule(f, [rule("by-path", unit=rel)]).id == "by-path"
        assert best_rule(f, [rule("other", unit=unit + "2")]) is None
        keys = kernel_keys(rule("by-name", unit=unit), cgroup_root=str(cgroup2_mount()))
        assert keys.cgroup_ids == {os.stat(path).st_ino}
        with running([SLEEP, "60"]) as outside:
            assert best_rule(procinfo.read_facts(outside.pid), [rule("u", unit=unit)]) is None


def test_kernel_threads_threads_and_gone_processes_have_no_facts() -> None:
    kthreads = [pid for pid in procinfo.all_pids()
                if (s := procinfo._flags_and_start(pid, "/proc")) and s[0] & procinfo.PF_KTHREAD]
    for pid in kthreads[:5]:
        assert procinfo.read_facts(pid) is None
    assert all(f.pid not in kthreads for f in procinfo.iter_facts())
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert t.native_id != os.getpid()
        assert procinfo.read_facts(t.native_id) is None  # a thread is not a process
        assert procinfo.read_facts(os.getpid()) is not None
    finally:
        stop.set()
        t.join()
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert procinfo.read_facts(gone.pid) is None or \
        procinfo.read_facts(gone.pid).start_time != procinfo.start_time(os.getpid())
    assert procinfo.start_time(2**22 + 5) is None


# --- what the kernel can decide ------------------------------------------------------------------
def tree(root: Path, files: list[str]) -> None:
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"#!/bin/sh\n")


def ids(root: Path, names: list[str]) -> frozenset[tuple[int, int]]:
    return frozenset((os.stat(root / n).st_dev, os.stat(root / n).st_ino) for n in names)


def test_exe_globs_expand_to_the_files_that_match_now(tmp_path: Path) -> None:
    tree(tmp_path, ["steam/steam", "steam/run.sh", "steam/ubuntu12_32/steam",
                    "steam/ubuntu12_32/deep/x", "opt/a/bin/tool", "opt/b/bin/tool",
                    "opt/b/bin/other", "opt/bin/tool"])
    files, dirs, complete = exe_files(f"{tmp_path}/steam/*")
    assert complete and files == ids(tmp_path, ["steam/steam", "steam/run.sh"])
    assert dirs == {str(tmp_path / "steam")}
    files, dirs, _ = exe_files(f"{tmp_path}/steam/**")
    assert files == ids(tmp_path, ["steam/steam", "steam/run.sh", "steam/ubuntu12_32/steam",
                                   "steam/ubuntu12_32/deep/x"])
    assert dirs == {str(tmp_path / d) for d in ("steam", "steam/ubuntu12_32",
                                               "steam/ubuntu12_32/deep")}
    files, dirs, _ = exe_files(f"{tmp_path}/opt/*/bin/tool")
    assert files == ids(tmp_path, ["opt/a/bin/tool", "opt/b/bin/tool"])
    assert str(tmp_path / "opt") in dirs and str(tmp_path / "opt/a/bin") in dirs
    files, _, _ = exe_files(f"{tmp_path}/opt/**/bin/tool")
    assert files == ids(tmp_path, ["opt/a/bin/tool", "opt/b/bin/tool", "opt/bin/tool"])
    files, dirs, _ = exe_files(f"{tmp_path}/not/yet/installed/*")
    assert files == frozenset() and dirs == {str(tmp_path)}  # a later install is noticed
    files, _, complete = exe_files(f"{tmp_path}/steam/**", max_files=2)
    assert not complete


def test_kernel_keys_and_user_space_rules(tmp_path: Path) -> None:
    tree(tmp_path, ["bin/wget"])
    cg = tmp_path / "cgroup"
    (cg / "system.slice" / "backup.service").mkdir(parents=True)
    (cg / "user.slice" / "user@1000.service" / "backup.service").mkdir(parents=True)
    exact = rule("wget", exe=str(tmp_path / "bin/wget"), uid=1000, comm="wget")
    k = kernel_keys(exact)
    assert (k.rule_id, k.uid, k.comm, k.has_exe) == ("wget", 1000, "wget", True)
    assert k.exe_files == ids(tmp_path, ["bin/wget"]) and not k.needs_user_space
    assert k.watch_dirs == {str(tmp_path / "bin")}
    by_name = kernel_keys(rule("b", unit="backup.service"), cgroup_root=str(cg))
    assert by_name.cgroup_ids == {os.stat(cg / "system.slice/backup.service").st_ino,
                                  os.stat(cg / "user.slice/user@1000.service/backup.service")
                                  .st_ino}
    assert by_name.has_unit and not by_name.needs_user_space
    by_path = kernel_keys(rule("b", unit="/system.slice/backup.service"), cgroup_root=str(cg))
    assert by_path.cgroup_ids == {os.stat(cg / "system.slice/backup.service").st_ino}
    missing = kernel_keys(rule("b", unit="/system.slice/nope.service"), cgroup_root=str(cg))
    assert missing.cgroup_ids == frozenset() and missing.needs_user_space
    globbed = kernel_keys(rule("g", exe=str(tmp_path / "bin/*")))
    assert globbed.needs_user_space and globbed.exe_files == k.exe_files
    assert kernel_keys(rule("c", cmdline="x")).needs_user_space
    rules = [exact, rule("g", exe=str(tmp_path / "bin/*")), rule("c", cmdline="x"),
             rule("off", cmdline="x", enabled=False)]
    assert [r.id for r in user_space_rules(rules)] == ["g", "c"]
    assert watch_dirs([k, globbed]) == {str(tmp_path / "bin")}


def test_issue9_unit_keys_say_which_cgroup_dirs_to_watch(tmp_path: Path) -> None:
    """A unit's cgroup is removed when it stops and made again (a new id) when it starts:
    its parent directory is where the change is seen."""
    cg = tmp_path / "cgroup"
    (cg / "system.slice" / "backup.service").mkdir(parents=True)
    (cg / "user.slice" / "user@1000.service" / "backup.service").mkdir(parents=True)
    by_name = kernel_keys(rule("b", unit="backup.service"), cgroup_root=str(cg))
    assert by_name.cgroup_dirs == {str(cg / "system.slice"),
                                   str(cg / "user.slice" / "user@1000.service")}
    by_path = kernel_keys(rule("b", unit="/system.slice/backup.service"), cgroup_root=str(cg))
    assert by_path.cgroup_dirs == {str(cg / "system.slice")}
    not_yet = kernel_keys(rule("b", unit="/system.slice/x.slice/y.service"),
                          cgroup_root=str(cg))
    assert not_yet.cgroup_dirs == {str(cg / "system.slice")}  # the nearest that exists
    anywhere = kernel_keys(rule("b", unit="nope.service"), cgroup_root=str(cg))
    assert anywhere.cgroup_dirs == frozenset() and anywhere.needs_user_space
    exe_only = kernel_keys(rule("e", exe=str(tmp_path / "bin/x")), cgroup_root=str(cg))
    assert exe_only.cgroup_dirs == frozenset()

