"""The runtime state: one file per entry, damaged entries dropped one by one, a limit
restored only for the same process (issue 9)."""

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
from chadthrottle.state import StateDir, StoredHeir, StoredLimit, StoredUnitLimit, restorable


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_state_round_trip(tmp_path: Path) -> None:
    rule = Rule.from_bus({"comm": "wget", "download": 51200, "id": "wget"})
    lim = StoredLimit(pid=4242, start_time=99, download=51200, uid=1000, origin="SetLimit")
    unit = StoredUnitLimit(unit="backup.service", upload=1_000_000, uid=0,
                           origin="SetUnitLimit")
    d = StateDir(tmp_path / "run")
    d.put_rule(rule)
    d.put_limit(lim)
    d.put_unit(unit)
    f = tmp_path / "run" / "limits" / "4242.json"
    assert mode(f) == 0o644 and mode(f.parent) == 0o755
    assert json.loads(f.read_text()) == {"download": 51200, "upload": 0, "uid": 1000,
                                         "origin": "SetLimit", "pid": 4242, "start_time": 99}
    loaded = d.load()
    assert loaded.problems == ()
    assert loaded.state.rules == (rule,)
    assert loaded.state.limits == (lim,)
    assert loaded.state.unit_limits == (unit,)
    d.drop_limit(4242)
    d.drop_unit("backup.service")
    d.drop_rule("wget")
    empty = d.load().state
    assert empty.rules == () and empty.limits == () and empty.unit_limits == ()


def test_state_refuses_permanent_rules(tmp_path: Path) -> None:
    rule = Rule.from_bus({"comm": "x", "download": 1024, "id": "x", "permanent": True})
    with pytest.raises(InvalidRule):
        StateDir(tmp_path).put_rule(rule)


def test_damaged_state_entries_are_dropped_one_by_one(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "limits").mkdir()
    (tmp_path / "rules" / "ok.json").write_text(
        json.dumps({"id": "ok", "comm": "wget", "download": 51200}))
    (tmp_path / "rules" / "bad.json").write_text(
        json.dumps({"id": "bad", "comm": "wget", "download": "fast"}))
    (tmp_path / "rules" / "perm.json").write_text(
        json.dumps({"id": "perm", "comm": "x", "download": 51200, "permanent": True}))
    (tmp_path / "limits" / "10.json").write_text(
        json.dumps({"pid": 10, "start_time": 5, "download": 2048, "uid": 0}))
    (tmp_path / "limits" / "11.json").write_text(
        json.dumps({"pid": "10", "start_time": 5, "download": 2048, "uid": 0}))
    (tmp_path / "limits" / "12.json").write_text(
        json.dumps({"pid": 11, "start_time": 5, "uid": 0}))
    (tmp_path / "limits" / "13.json").write_bytes(b"{not json")
    loaded = StateDir(tmp_path).load()
    assert [r.id for r in loaded.state.rules] == ["ok"]
    assert [lim.pid for lim in loaded.state.limits] == [10]
    assert len(loaded.problems) == 5
    assert any("'download'" in p for p in loaded.problems)


def test_no_state_dir_is_an_empty_state(tmp_path: Path) -> None:
    loaded = StateDir(tmp_path / "none").load()
    assert loaded.state.limits == () and loaded.problems == ()


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


def test_issue9_heirs_round_trip_and_damaged_ones_dropped(tmp_path: Path) -> None:
    """A process carrying a rule's limit after the process the rule matched exited."""
    d = StateDir(tmp_path)
    heir = StoredHeir(pid=4343, start_time=912399, rule="steam")
    d.put_heir(heir)
    assert json.loads((tmp_path / "heirs" / "4343.json").read_text()) == \
        {"pid": 4343, "start_time": 912399, "rule": "steam"}
    (tmp_path / "heirs" / "5.json").write_text(
        json.dumps({"pid": 5, "start_time": 1, "rule": "../etc/x"}))
    (tmp_path / "heirs" / "6.json").write_text(json.dumps({"pid": 6, "start_time": 1}))
    loaded = d.load()
    assert loaded.state.heirs == (heir,)
    assert len(loaded.problems) == 2 and all("heir dropped" in p for p in loaded.problems)
    assert d.heirs() == (heir,)
    d.drop_heir(4343)
    assert d.load().state.heirs == ()
    keep, drop = restorable([heir], start_time_of=lambda pid: 912399)
    assert keep == [heir] and drop == []
