"""chadthrottlectl rule … against the real daemon on a private bus (issue 9).

The client side is covered without a daemon by tests/unit/test_cli_rules.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import chadthrottle
from chadthrottle import names
from chadthrottle.cli.rules import RULE_JSON_KEYS
from conftest import env_with, start_daemon, stop_pid

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the daemon loads BPF)"),
]

SOURCE_ROOT = str(Path(chadthrottle.__file__).resolve().parents[1])
SLEEP = os.path.realpath(shutil.which("sleep") or "/bin/sleep")


@pytest.fixture
def rules_daemon(system_bus, tmp_path):
    """The real chadthrottled with its own config and state dirs below tmp_path."""
    config, state = tmp_path / "etc", tmp_path / "run"
    d = start_daemon(system_bus, tmp_path / "chadthrottled.log",
                     f"--config-dir={config}", f"--state-dir={state}")
    try:
        yield d, config, state
    finally:
        stop_pid(d.proc, 15.0)


def ctl(address: str, *args: str) -> subprocess.CompletedProcess:
    env = env_with(address, PYTHONPATH=SOURCE_ROOT, COLUMNS="160")
    return subprocess.run([sys.executable, "-m", "chadthrottle.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_rule_add_list_reload_remove_with_the_real_daemon(rules_daemon, system_bus,
                                                          tmp_path) -> None:
    daemon, config, _ = rules_daemon
    copy = tmp_path / "apps" / "ct-rule-sleep"
    copy.parent.mkdir()
    shutil.copy2(SLEEP, copy)
    proc = subprocess.Popen([str(copy), "300"], stdin=subprocess.DEVNULL)
    try:
        r = ctl(system_bus, "rule", "add", "--exe", str(copy), "-d", "50K", "--label", "test")
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("Added rule test (until reboot): ")

        r = ctl(system_bus, "rule", "list", "--json")
        assert r.returncode == 0, r.stderr
        (row,) = json.loads(r.stdout)
        assert tuple(row)[:len(RULE_JSON_KEYS)] == RULE_JSON_KEYS
        assert (row["id"], row["exe"], row["download"], row["permanent"], row["matched"]) == \
            ("test", str(copy), 50_000, False, 1)

        r = ctl(system_bus, "list", "--json")
        assert r.returncode == 0, r.stderr
        assert {"pid": proc.pid, "rule": "test"}.items() <= \
            next(x for x in json.loads(r.stdout) if x["pid"] == proc.pid).items()

        r = ctl(system_bus, "rule", "add", "--name", "wget", "-u", "1M", "--permanent")
        assert r.returncode == 0, r.stderr
        assert (config / "rules.d" / "wget.toml").exists()

        (config / "rules.d" / "broken.toml").write_text('comm = "x"\ndownload = "fast"\n')
        r = ctl(system_bus, "rule", "reload")
        assert r.returncode == 1
        assert "broken.toml" in r.stderr and "'download'" in r.stderr
        assert f"[{names.ERR_INVALID_RULE}]" in r.stderr
        (config / "rules.d" / "broken.toml").unlink()
        assert ctl(system_bus, "rule", "reload").returncode == 0

        r = ctl(system_bus, "rule", "add", "--user", "root", "-d", "100")
        assert r.returncode == 2  # below the smallest rate: refused before the bus

        for rule_id in ("test", "wget"):
            r = ctl(system_bus, "rule", "remove", rule_id)
            assert r.returncode == 0, r.stderr
        assert not (config / "rules.d" / "wget.toml").exists()
        r = ctl(system_bus, "rule", "remove", "test")
        assert r.returncode == 1 and f"[{names.ERR_NO_SUCH_RULE}]" in r.stderr
        assert ctl(system_bus, "rule", "list", "-q").stdout == ""
    finally:
        stop_pid(proc)
    assert daemon.alive()
