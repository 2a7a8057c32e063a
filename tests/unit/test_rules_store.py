"""Rule files and the runtime state: loaded as a whole, written atomically, restored only for
the same process (issue 9)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from chadthrottle.errors import InvalidRule
from chadthrottle.procfs import terminate
from chadthrottle.rules import procinfo
from chadthrottle.rules.model import Rule
from chadthrottle.rules.ruleset import RuleSet
from chadthrottle.rules.store import (
    RuleFiles,
    State,
    StateFile,
    StoredLimit,
    StoredUnitLimit,
    atomic_write,
    restorable,
)

STEAM_TOML = ('name = "Steam downloads"\nexe = "/usr/lib/steam/*"\nscope = "application"\n'
              'download = 5_000_000\n')
WGET_TOML = 'comm = "wget"\ndownload = 51200\nupload = 0\n'


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    d = tmp_path / "etc" / "rules.d"
    d.mkdir(parents=True)
    (d / "steam.toml").write_text(STEAM_TOML)
    (d / "wget.toml").write_text(WGET_TOML)
    return d


def test_load_reads_every_rule_file(rules_dir: Path) -> None:
    (rules_dir / ".steam.toml.swp").write_text("junk")
    (rules_dir / "steam.toml~").write_text("junk")
    (rules_dir / "README").write_text("junk")
    rules = RuleFiles(rules_dir).load()
    assert [r.id for r in rules] == ["steam", "wget"]
    assert all(r.permanent for r in rules)
    assert rules[0].scope == "application" and rules[1].comm == "wget"


def test_missing_directory_is_no_rules(tmp_path: Path) -> None:
    assert RuleFiles(tmp_path / "nope").load() == ()


def test_one_broken_file_refuses_the_whole_load(rules_dir: Path) -> None:
    before = RuleSet(RuleFiles(rules_dir).load())
    (rules_dir / "wget.toml").write_text(WGET_TOML + 'uid = "1000"\n')
    with pytest.raises(InvalidRule) as info:
        before.with_permanent(RuleFiles(rules_dir).load())
    e = info.value
    assert e.source == str(rules_dir / "wget.toml") and e.key == "uid"
    assert str(e).startswith(f"{rules_dir / 'wget.toml'}: key 'uid': must be an integer")
    assert [r.id for r in before.values()] == ["steam", "wget"]  # nothing changed
    assert before["wget"].uid is None


@pytest.mark.parametrize(("name", "content", "words"), [
    ("Steam Downloads.toml", WGET_TOML, "file name must be <id>.toml"),
    ("bad.toml", "comm = 'wget'\ndownload = [\n", "not valid TOML"),
    ("latin.toml", b"comm = '\xe9'\ndownload = 51200\n", "not UTF-8"),
    ("big.toml", "# " + "x" * 70_000 + "\n" + WGET_TOML, "larger than"),
    ("dir.toml", None, "not a regular file"),
])
def test_broken_files_are_named(rules_dir: Path, name: str, content, words: str) -> None:
    path = rules_dir / name
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(InvalidRule) as info:
        RuleFiles(rules_dir).load()
    assert str(info.value).startswith(str(path) + ": ") and words in str(info.value)
    assert info.value.source == str(path)


def test_write_is_atomic_0644_in_a_0755_directory_and_reads_back(tmp_path: Path) -> None:
    files = RuleFiles(tmp_path / "cfg" / "rules.d")
    rule = Rule.from_bus({"exe": "/usr/lib/steam/*", "download": 5_000_000, "id": "steam",
                          "permanent": True, "scope": "application"})
    old_umask = os.umask(0o077)
    try:
        path = files.write(rule)
    finally:
        os.umask(old_umask)
    assert path == tmp_path / "cfg" / "rules.d" / "steam.toml"
    assert mode(path) == 0o644
    assert mode(path.parent) == 0o755 and mode(path.parent.parent) == 0o755
    assert os.listdir(path.parent) == ["steam.toml"]  # no temporary file left
    assert files.load() == (rule,)
    assert files.remove("steam") is True
    assert files.remove("steam") is False
    assert files.load() == ()


def test_runtime_rules_have_no_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidRule):
        RuleFiles(tmp_path).write(Rule.from_bus({"comm": "x", "download": 1024, "id": "x"}))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path,
                                                              monkeypatch) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"old")

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        atomic_write(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_state_round_trip(tmp_path: Path) -> None:
    state = State(
        rules=(Rule.from_bus({"comm": "wget", "download": 51200, "id": "wget"}),),
        limits=(StoredLimit(pid=4242, start_time=99, download=51200, uid=1000,
                            origin="SetLimit"),),
        unit_limits=(StoredUnitLimit(unit="backup.service", upload=1_000_000, uid=0,
                                     origin="SetUnitLimit"),),
    )
    f = StateFile(tmp_path / "run" / "state.json")
    f.save(state)
    assert mode(f.path) == 0o644 and mode(f.path.parent) == 0o755
    data = json.loads(f.path.read_text())
    assert data["version"] == 1
    assert data["limits"] == [{"download": 51200, "upload": 0, "uid": 1000,
                               "origin": "SetLimit", "pid": 4242, "start_time": 99}]
    assert data["rules"][0]["id"] == "wget"
    loaded = f.load()
    assert loaded.problems == ()
    assert loaded.state == state


def test_state_refuses_permanent_rules(tmp_path: Path) -> None:
    rule = Rule.from_bus({"comm": "x", "download": 1024, "id": "x", "permanent": True})
    with pytest.raises(InvalidRule):
        StateFile(tmp_path / "s.json").save(State(rules=(rule,)))


def test_damaged_state_entries_are_dropped_one_by_one(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({
        "version": 1,
        "rules": [{"id": "ok", "comm": "wget", "download": 51200},
                  {"id": "bad", "comm": "wget", "download": "fast"},
                  {"id": "perm", "comm": "x", "download": 51200, "permanent": True}],
        "limits": [{"pid": 10, "start_time": 5, "download": 2048, "uid": 0},
                   {"pid": "10", "start_time": 5, "download": 2048, "uid": 0},
                   {"pid": 11, "start_time": 5, "uid": 0}],
    }))
    loaded = StateFile(path).load()
    assert [r.id for r in loaded.state.rules] == ["ok"]
    assert [lim.pid for lim in loaded.state.limits] == [10]
    assert len(loaded.problems) == 4
    assert any("'download'" in p for p in loaded.problems)


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"version": 99}', b"\xff"])
def test_unreadable_state_is_empty_with_a_problem(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    loaded = StateFile(path).load()
    assert loaded.state == State() and len(loaded.problems) == 1


def test_no_state_file_is_an_empty_state(tmp_path: Path) -> None:
    assert StateFile(tmp_path / "none.json").load().state == State()


def test_restore_only_the_same_process_never_a_reused_pid() -> None:
    child = subprocess.Popen(["sleep", "60"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        real = procinfo.start_time(child.pid)
        assert real is not None
        same = StoredLimit(pid=child.pid, start_time=real, download=51200, uid=0)
        reused = StoredLimit(pid=child.pid, start_time=real + 1, download=51200, uid=0)
        exited = StoredLimit(pid=gone.pid, start_time=real, download=51200, uid=0)
        keep, drop = restorable([same, reused, exited])
        assert keep == [same]
        assert [(lim, why.split(" ")[0]) for lim, why in drop] == [(reused, "pid"),
                                                                   (exited, "exited")]
        assert "reused" in drop[0][1]
    finally:
        terminate(child)
