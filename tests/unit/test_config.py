"""The daemon's settings file (issue 11): a strict model whose every error names the file
and the key; the command line over the file over the environment over the defaults."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from chadthrottle import config, paths
from chadthrottle.config import ListenAddress, Settings, effective, from_toml, load, parse_listen
from chadthrottle.errors import InvalidConfig
from chadthrottle.server.main import EXIT_NOT_CONFIGURED, load_settings, main, parse_args

SRC = "/etc/chadthrottle/chadthrottled.toml"


def invalid(text: str) -> InvalidConfig:
    with pytest.raises(InvalidConfig) as info:
        from_toml(text, SRC)
    return info.value


# --- every error names the file and its key -----------------------------------------------------
@pytest.mark.parametrize(("text", "key", "words"), [
    ('colour = "red"', "colour", "unknown key 'colour' (the keys are: log_level, monitor_all"),
    ('log_level = "verbose"', "log_level", "must be one of 'debug', 'info', 'warning', 'error'"),
    ('log_level = "INFO"', "log_level", "must be one of"),
    ("log_level = 7", "log_level", "not an integer 7"),
    ('monitor_all = "yes"', "monitor_all", "must be true or false (a boolean), not a string"),
    ("monitor_all = 1", "monitor_all", "must be true or false (a boolean), not an integer 1"),
    ('metrics = "127.0.0.1:9917"', "metrics", "must be a table ([metrics])"),
    ('[metrics]\nport = 9917', "metrics.port", "unknown key 'metrics.port' (the keys are: "
     "metrics.listen)"),
    ("[metrics]\nlisten = 9917", "metrics.listen", "must be a string, not an integer 9917"),
    ('[metrics]\nlisten = "9917"', "metrics.listen", "an IP address and a port"),
    ('[metrics]\nlisten = "localhost:9917"', "metrics.listen", "host names are not looked up"),
    ('[metrics]\nlisten = "::1:9917"', "metrics.listen", "written in brackets: [::1]:9917"),
    ('[metrics]\nlisten = "[::zz]:9917"', "metrics.listen", "is not an IPv6 address"),
    ('[metrics]\nlisten = "127.0.0.1:0"', "metrics.listen", "from 1 to 65535"),
    ('[metrics]\nlisten = "127.0.0.1:70000"', "metrics.listen", "from 1 to 65535"),
    ('[metrics]\nlisten = "127.0.0.1:http"', "metrics.listen", "from 1 to 65535"),
    ('[metrics]\nlisten = "127.0.0.1 :9917"', "metrics.listen", "must not contain spaces"),
    ('[metrics]\nlisten = "unix:metrics.sock"', "metrics.listen", "absolute path"),
    ('[metrics]\nlisten = "unix:/run/chadthrottle/"', "metrics.listen", "not a directory"),
    ('[metrics]\nlisten = "unix:/' + "x" * 120 + '"', "metrics.listen", "at most 107 bytes"),
    ('log_level = "info"\nmonitor_all = tru', "monitor_all", "not valid TOML"),
])
def test_every_error_names_the_file_and_its_key(text, key, words) -> None:
    e = invalid(text)
    assert e.key == key and e.source == SRC
    assert str(e).startswith(SRC + ": ")
    assert words in str(e), str(e)
    assert f"key '{key}'" in str(e) or f"unknown key '{key}'" in str(e)


def test_several_errors_are_all_named() -> None:
    e = invalid('log_level = "loud"\nmonitor_all = "no"\n[metrics]\nlisten = "x"\n')
    for key in ("'log_level'", "'monitor_all'", "'metrics.listen'"):
        assert key in str(e)


def test_a_valid_file_and_the_defaults() -> None:
    s = from_toml('log_level = "debug"\nmonitor_all = true\n[metrics]\n'
                  'listen = "127.0.0.1:9917"\n', SRC)
    assert (s.log_level, s.monitor_all) == ("debug", True)
    assert s.metrics.address == ListenAddress(host="127.0.0.1", port=9917)
    empty = from_toml("", SRC)
    assert empty == Settings() and empty.metrics.address is None
    assert from_toml('[metrics]\nlisten = ""\n', SRC).metrics.address is None


@pytest.mark.parametrize(("text", "expected", "shown"), [
    ("127.0.0.1:9917", ListenAddress("127.0.0.1", 9917), "127.0.0.1:9917"),
    ("0.0.0.0:9917", ListenAddress("0.0.0.0", 9917), "0.0.0.0:9917"),
    ("[::1]:9917", ListenAddress("::1", 9917), "[::1]:9917"),
    ("[0:0::1]:1", ListenAddress("::1", 1), "[::1]:1"),
    ("unix:/run/chadthrottle/metrics.sock", ListenAddress(path="/run/chadthrottle/metrics.sock"),
     "unix:/run/chadthrottle/metrics.sock"),
])
def test_listen_addresses(text, expected, shown) -> None:
    got = parse_listen(text)
    assert got == expected and str(got) == shown
    assert got.is_loopback == (text != "0.0.0.0:9917")


# --- files ---------------------------------------------------------------------------------------
def test_a_missing_file_is_the_defaults(tmp_path: Path) -> None:
    assert load(tmp_path / "chadthrottled.toml") == Settings()


def test_files_that_cannot_be_read_are_named(tmp_path: Path) -> None:
    directory = tmp_path / "chadthrottled.toml"
    directory.mkdir()
    with pytest.raises(InvalidConfig) as info:
        load(directory)
    assert str(info.value).startswith(f"{directory}: cannot be read")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'log_level = "d\xe9bug"\n')
    with pytest.raises(InvalidConfig) as info:
        load(bad)
    assert str(info.value) == f"{bad}: is not UTF-8 text (byte 14)"


# --- command line > file > environment > defaults ----------------------------------------------
FILE = from_toml('log_level = "warning"\nmonitor_all = false\nmax_limits = 4096\n[metrics]\n'
                 'listen = "127.0.0.1:9917"\n', SRC)


def test_the_command_line_wins() -> None:
    e = effective(FILE, {"CHADTHROTTLE_MONITOR_ALL": "1", "CHADTHROTTLE_LOG": "debug"},
                  log_level="error", monitor_all=True, metrics_listen="unix:/run/m.sock",
                  max_limits=100_000)
    assert (e.log_level, e.monitor_all, str(e.metrics)) == ("error", True, "unix:/run/m.sock")
    assert e.max_limits == 100_000
    assert set(e.sources.values()) == {"option"}
    assert effective(FILE, {}, metrics_listen="").metrics is None  # '' turns it off


def test_the_file_wins_over_the_environment() -> None:
    # the packaged unit sets CHADTHROTTLE_LOG=info: the administrator's file must win
    e = effective(FILE, {"CHADTHROTTLE_MONITOR_ALL": "1", "CHADTHROTTLE_LOG": "info"})
    assert (e.log_level, e.monitor_all, str(e.metrics)) == ("warning", False, "127.0.0.1:9917")
    assert e.sources == {"log_level": "file", "monitor_all": "file", "metrics.listen": "file",
                         "max_limits": "file"}
    assert e.max_limits == 4096
    assert "log_level=warning [file]" in e.describe()
    assert "max_limits=4096 [file]" in e.describe()


def test_the_environment_then_the_defaults() -> None:
    e = effective(Settings(), {"CHADTHROTTLE_MONITOR_ALL": "1", "CHADTHROTTLE_LOG": "debug"})
    assert (e.log_level, e.monitor_all, e.metrics) == (None, True, None)
    assert e.sources == {"log_level": "environment", "monitor_all": "environment",
                         "metrics.listen": "default", "max_limits": "default"}
    d = effective(Settings(), {})
    assert (d.log_level, d.monitor_all, d.metrics) == (None, False, None)
    assert set(d.sources.values()) == {"default"}
    assert "metrics.listen=off [default]" in d.describe()


def test_a_bad_command_line_address_names_the_option() -> None:
    with pytest.raises(InvalidConfig) as info:
        effective(Settings(), {}, metrics_listen="localhost:9917")
    assert info.value.key == "metrics.listen"
    assert str(info.value).startswith("--metrics-listen: ")


def test_the_daemon_reads_the_file_of_its_config_dir(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / paths.SETTINGS_FILE).write_text("monitor_all = true\n[metrics]\n"
                                                'listen = "[::1]:9917"\n')
    monkeypatch.delenv("CHADTHROTTLE_MONITOR_ALL", raising=False)
    args = parse_args(["--config-dir", str(tmp_path), "--state-dir", str(tmp_path)])
    eff = load_settings(args, {})
    assert args.monitor_all is True and str(eff.metrics) == "[::1]:9917"
    args = parse_args(["--config-dir", str(tmp_path), "--no-monitor-all",
                       "--metrics-listen", ""])
    eff = load_settings(args, {})
    assert args.monitor_all is False and eff.metrics is None


def test_a_broken_file_stops_the_daemon_before_anything_starts(tmp_path: Path, capsys,
                                                               monkeypatch) -> None:
    (tmp_path / paths.SETTINGS_FILE).write_text('[metrics]\nlisten = "127.0.0.1"\n')
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)  # main() raises it: put it back
    try:
        rc = main(["--config-dir", str(tmp_path), "--state-dir", str(tmp_path),
                   "--log-target", "stderr"])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
    assert rc == EXIT_NOT_CONFIGURED
    err = capsys.readouterr().err
    assert f"cannot start: {tmp_path / paths.SETTINGS_FILE}: key 'metrics.listen'" in err
    assert sorted(os.listdir(tmp_path)) == [paths.SETTINGS_FILE]  # nothing was made


def test_the_keys_are_the_documented_ones() -> None:
    assert config.KEYS == {"": ("log_level", "monitor_all", "max_limits", "metrics"),
                           "metrics": ("listen",)}


@pytest.mark.parametrize("text", ["max_limits = 8", "max_limits = 2_000_000",
                                  'max_limits = "4096"', "max_limits = 4096.0"])
def test_max_limits_is_a_whole_number_in_its_range(text: str) -> None:
    with pytest.raises(InvalidConfig) as info:
        from_toml(text, SRC)
    assert "max_limits" in str(info.value)


def test_a_bad_max_limits_option_names_the_option() -> None:
    with pytest.raises(InvalidConfig) as info:
        effective(Settings(), {}, max_limits=3)
    assert "--max-limits" in str(info.value)
