"""Fixtures of the applet's tests: the dbus helpers of tests/dbus (a private system bus with
the project's policy, the real daemon), a headless desktop, and line-protocol helpers for
programs that run on the distribution's /usr/bin/python3 (the venv's interpreter cannot
import gi)."""

from __future__ import annotations

import importlib.util
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .desktop import ROOT, SRC, SYSTEM_PYTHON, gui_deps_missing, terminate

_spec = importlib.util.spec_from_file_location("chadthrottle_tests_dbus_helpers",
                                               ROOT / "tests" / "dbus" / "conftest.py")
dbus_helpers = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = dbus_helpers  # dataclasses look their module up there
_spec.loader.exec_module(dbus_helpers)

requires_root = dbus_helpers.requires_root
requires_bpf_object = dbus_helpers.requires_bpf_object


@pytest.fixture
def gui_deps() -> None:
    """The GUI stack must be there: `make deps` and .ci/run install it, so its absence is a
    failure, not a skip."""
    missing = gui_deps_missing()
    if missing:
        pytest.fail(f"{missing}; run `make deps` (it installs the GUI test packages)")


@pytest.fixture
def private_bus():
    """A private system bus with the project's policy; its address.  No daemon on it yet."""
    if shutil.which("dbus-daemon") is None:
        pytest.fail("dbus-daemon is not installed")
    d = tempfile.mkdtemp(prefix="chadthrottle-gui-bus-")
    os.chmod(d, 0o755)
    bus = dbus_helpers.PrivateBus(d, policy_dir=ROOT / "dbus")
    try:
        yield bus.start()
    finally:
        bus.stop()
        shutil.rmtree(d, ignore_errors=True)


class LineProgram:
    """A helper program on /usr/bin/python3 that speaks JSON lines on stdin/stdout."""

    def __init__(self, script: Path, env: dict[str, str], *args: str) -> None:
        env = dict(env)
        env["PYTHONPATH"] = str(SRC)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.proc = subprocess.Popen([SYSTEM_PYTHON, str(script), *args], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        self._buf = b""
        self._sel = selectors.DefaultSelector()
        assert self.proc.stdout
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)

    def send(self, *cmd: object) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(json.dumps(list(cmd)) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float) -> dict | None:
        """The next JSON line, or None after timeout seconds.  Lines are split here from raw
        reads: a buffered readline() could hold further lines where select() cannot see
        them."""
        assert self.proc.stdout
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(left):
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"{self.proc.args[1]} exited "
                                     f"({self.proc.wait()}): {self.stderr()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        line = line.strip()
        return json.loads(line) if line else self.read(max(0.0, deadline - time.monotonic()))

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()[-3000:]

    def close(self) -> int | None:
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        rc = terminate(self.proc)
        self._sel.close()
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()
        return rc


sleeper = dbus_helpers.sleeper  # idle processes to limit, stopped by pid afterwards
