"""For every test: the daemon's configuration and state directories are a temporary pair
for the whole session, so no test reads or writes /etc/chadthrottle or /run/chadthrottle
(daemons that tests start get them through the environment; tests that need their own pass
their own).  Removed at the end.

The machine is left as the session found it: ``hostguard`` snapshots it before the first
test and the session fails if anything of ours is still there after the last one."""

from __future__ import annotations

import hashlib  # noqa: F401 - it and ssl load for real before chadthrottle.server marks
import os  # them absent (the daemon's own memory saving; tests use both)
import shutil
import ssl  # noqa: F401
import tempfile

import pytest

import hostguard

_BEFORE = hostguard.snapshot()
_DIR = tempfile.mkdtemp(prefix="chadthrottle-test-dirs-")
os.environ.setdefault("CHADTHROTTLE_STATE_DIR", os.path.join(_DIR, "state"))
os.environ.setdefault("CHADTHROTTLE_CONFIG_DIR", os.path.join(_DIR, "etc"))


@pytest.fixture(scope="session", autouse=True)
def _private_daemon_dirs():
    yield
    shutil.rmtree(_DIR, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_DIR, ignore_errors=True)  # also when collection failed (no fixture ran)
    left = hostguard.leftovers(_BEFORE, hostguard.snapshot())
    if not left:
        return
    lines = ["the test session left these on the machine:"]
    for what, items in left.items():
        lines += [f"  {what}:"] + [f"    {x}" for x in items]
    session.config.pluginmanager.get_plugin("terminalreporter").write_line(
        "\n".join(lines), red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
