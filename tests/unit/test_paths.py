"""Config and state directories: option, else environment variable, else default (issue 9)."""

from __future__ import annotations

from pathlib import Path

import pytest

from chadthrottle import paths
from chadthrottle.server.main import parse_args


def test_defaults() -> None:
    p = paths.resolve(None, None, {})
    assert p.config_dir == Path("/etc/chadthrottle") and p.state_dir == Path("/run/chadthrottle")
    assert p.rules_dir == Path("/etc/chadthrottle/rules.d")
    assert p.state_file == Path("/run/chadthrottle/state.json")


def test_environment_then_option() -> None:
    env = {"CHADTHROTTLE_CONFIG_DIR": "/tmp/cfg", "CHADTHROTTLE_STATE_DIR": "/tmp/state"}
    p = paths.resolve(None, None, env)
    assert (p.config_dir, p.state_dir) == (Path("/tmp/cfg"), Path("/tmp/state"))
    p = paths.resolve("/opt/cfg", None, env)
    assert (p.config_dir, p.state_dir) == (Path("/opt/cfg"), Path("/tmp/state"))
    assert paths.resolve(None, None, {"CHADTHROTTLE_CONFIG_DIR": ""}).config_dir == \
        Path("/etc/chadthrottle")


@pytest.mark.parametrize(("option", "env", "words"), [
    ("cfg", {}, "--config-dir"),
    (None, {"CHADTHROTTLE_CONFIG_DIR": "./cfg"}, "$CHADTHROTTLE_CONFIG_DIR"),
])
def test_relative_paths_are_refused_naming_their_source(option, env, words) -> None:
    with pytest.raises(ValueError) as info:
        paths.resolve(option, None, env)
    assert words in str(info.value) and "absolute" in str(info.value)


def test_daemon_options(monkeypatch, capsys) -> None:
    monkeypatch.setenv("CHADTHROTTLE_STATE_DIR", "/tmp/ct-state")
    monkeypatch.delenv("CHADTHROTTLE_CONFIG_DIR", raising=False)
    args = parse_args(["--config-dir", "/tmp/ct-cfg"])
    assert args.paths == paths.Paths(Path("/tmp/ct-cfg"), Path("/tmp/ct-state"))
    with pytest.raises(SystemExit) as info:
        parse_args(["--state-dir", "relative"])
    assert info.value.code == 2
    assert "--state-dir" in capsys.readouterr().err
