"""Resolving --name to a pid from a /proc tree (a fake one, and the real one)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from chadthrottle.cli.procs import comm_of, find_by_name, matches


def fake_proc(root: Path, pid: int, comm: str, argv: list[str]) -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + (b"\0" if argv else b""))


def test_find_by_name_in_a_fake_tree(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, "wget", ["wget", "http://x"])
    fake_proc(tmp_path, 11, "kworker/0:1", [])  # kernel thread: no argv
    fake_proc(tmp_path, 12, "python3", ["/usr/bin/python3", "-m", "http.server"])
    fake_proc(tmp_path, 13, "wget", ["/usr/bin/wget", "-c", "y"])
    fake_proc(tmp_path, 14, "a-very-long-pro", ["/opt/a-very-long-program-name"])
    (tmp_path / "self").mkdir()
    (tmp_path / "meminfo").write_text("")
    assert [p.pid for p in find_by_name("wget", str(tmp_path))] == [10, 13]
    assert [p.pid for p in find_by_name("wget", str(tmp_path), exclude={13})] == [10]
    assert find_by_name("kworker/0:1", str(tmp_path)) == []
    assert [p.pid for p in find_by_name("python3", str(tmp_path))] == [12]
    assert [p.pid for p in find_by_name("a-very-long-program-name", str(tmp_path))] == [14]
    assert find_by_name("curl", str(tmp_path)) == []
    assert find_by_name("", str(tmp_path)) == []
    assert find_by_name("x", str(tmp_path / "missing")) == []
    assert find_by_name("wget", str(tmp_path))[1].cmdline == "/usr/bin/wget -c y"


def test_matches_rules() -> None:
    assert matches("wget", "wget", ["wget"])
    assert matches("wget", "something", ["/usr/bin/wget"])
    assert not matches("wge", "wget", ["wget"])
    assert matches("abcdefghijklmnopq", "abcdefghijklmno", ["x"])


def test_real_proc_lookup() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                             stdin=subprocess.DEVNULL)
    try:
        # wait for the exec to finish: in the middle of it /proc/PID/cmdline reads empty
        deadline = time.monotonic() + 10
        while b"time.sleep" not in Path(f"/proc/{child.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "child never exec'd"
            time.sleep(0.01)
        assert comm_of(child.pid)
        name = os.path.basename(sys.executable)
        assert child.pid in [p.pid for p in find_by_name(name)]
        assert os.getpid() not in [p.pid for p in find_by_name(name, exclude={os.getpid()})]
    finally:
        child.kill()
        child.wait()
    assert comm_of(child.pid) is None
