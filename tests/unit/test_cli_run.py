"""The fork-park-exec mechanics behind `chadthrottlectl run` (no daemon involved)."""

from __future__ import annotations

import errno
import os
import signal

from chadthrottle.cli.run import GO, ExecFailed, exit_code_of, spawn_parked


def _finish(pid: int, go_w: int, err_r: int, release: bool) -> tuple[int, bytes]:
    if release:
        os.write(go_w, GO)
    os.close(go_w)
    err = os.read(err_r, 32)
    os.close(err_r)
    _, status = os.waitpid(pid, 0)
    return exit_code_of(status), err


def test_parked_child_runs_only_when_released(tmp_path) -> None:
    marker = tmp_path / "ran"
    pid, go_w, err_r = spawn_parked(["sh", "-c", f"touch {marker}; exit 3"])
    # still parked: it has not exec'd (its comm is still the Python interpreter's)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"touch" not in f.read()
    assert not marker.exists()
    assert _finish(pid, go_w, err_r, release=True) == (3, b"")
    assert marker.exists()


def test_abandoned_child_never_runs_the_command(tmp_path) -> None:
    marker = tmp_path / "ran"
    pid, go_w, err_r = spawn_parked(["sh", "-c", f"touch {marker}"])
    code, err = _finish(pid, go_w, err_r, release=False)
    assert code == 1 and err == b"" and not marker.exists()


def test_exec_failure_is_reported() -> None:
    pid, go_w, err_r = spawn_parked(["/nonexistent/program"])
    code, err = _finish(pid, go_w, err_r, release=True)
    assert code == 127 and int(err) == errno.ENOENT
    assert ExecFailed("x", errno.ENOENT).exit_code == 127
    assert ExecFailed("x", errno.EACCES).exit_code == 126


def test_child_gets_default_sigpipe() -> None:
    # Python ignores SIGPIPE; the command must not inherit that.
    pid, go_w, err_r = spawn_parked(["sh", "-c", "yes | head -c1 >/dev/null; exit 0"])
    assert _finish(pid, go_w, err_r, release=True)[0] == 0
    pid, go_w, err_r = spawn_parked(["sh", "-c", "kill -PIPE $$"])
    assert _finish(pid, go_w, err_r, release=True)[0] == 128 + signal.SIGPIPE


def test_exit_codes_follow_the_shell_convention() -> None:
    assert exit_code_of(0) == 0
    assert exit_code_of(3 << 8) == 3
    assert exit_code_of(signal.SIGKILL) == 128 + signal.SIGKILL
