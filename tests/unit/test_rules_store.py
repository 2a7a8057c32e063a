"""Rule files: loaded as a whole, written atomically (issue 9)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from chadthrottle.atomicfile import atomic_write
from chadthrottle.errors import InvalidRule
from chadthrottle.rules.model import Rule
from chadthrottle.rules.ruleset import RuleSet
from chadthrottle.rules.store import RuleFiles

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
