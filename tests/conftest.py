"""For every test: the daemon's configuration and state directories are a temporary pair
for the whole session, so no test reads or writes /etc/chadthrottle or /run/chadthrottle
(daemons that tests start get them through the environment; tests that need their own pass
their own).  Removed at the end."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_DIR = tempfile.mkdtemp(prefix="chadthrottle-test-dirs-")
os.environ.setdefault("CHADTHROTTLE_STATE_DIR", os.path.join(_DIR, "state"))
os.environ.setdefault("CHADTHROTTLE_CONFIG_DIR", os.path.join(_DIR, "etc"))


@pytest.fixture(scope="session", autouse=True)
def _private_daemon_dirs():
    yield
    shutil.rmtree(_DIR, ignore_errors=True)
