"""chadthrottlectl argument parsing and exit codes (no daemon needed)."""

from __future__ import annotations

import pytest

from chadthrottle.cli.main import EXIT_DAEMON, EXIT_USAGE, PID_MAX, build_parser, check_args, main


def parse(*argv: str):
    args = build_parser().parse_args(list(argv))
    check_args(args)
    return args


def usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == EXIT_USAGE
    return capsys.readouterr().err


def test_limit_pid_with_both_rates() -> None:
    a = parse("limit", "1234", "-d", "50K", "-u", "1M")
    assert (a.cmd, a.pid, a.name, a.download, a.upload) == ("limit", 1234, None, 50_000, 1_000_000)


def test_limit_by_name_and_long_options() -> None:
    a = parse("limit", "--name", "wget", "--download", "512KiB/s")
    assert (a.pid, a.name, a.download, a.upload) == (None, "wget", 524_288, None)


def test_limit_needs_a_rate(capsys) -> None:
    assert "give a download (-d) and/or upload (-u)" in usage_error(capsys, "limit", "12")


def test_limit_needs_exactly_one_target(capsys) -> None:
    assert "PID" in usage_error(capsys, "limit", "-d", "1M")
    assert "not allowed" in usage_error(capsys, "limit", "12", "--name", "x", "-d", "1M")


@pytest.mark.parametrize("pid", ["0", "-1", "abc", str(PID_MAX + 1), "1.5"])
def test_bad_pids_are_usage_errors(capsys, pid: str) -> None:
    assert "process id" in usage_error(capsys, "stats", "--", pid) or pid == "-1"


def test_bad_rates_are_usage_errors_with_the_reason(capsys) -> None:
    err = usage_error(capsys, "limit", "12", "-d", "10Mb")
    assert "ambiguous" in err and "Mbit" in err
    assert "below the smallest limit" in usage_error(capsys, "limit", "12", "-u", "100")
    assert "unknown unit" in usage_error(capsys, "unit", "limit", "x.scope", "-d", "3Q")


def test_zero_rate_is_accepted_for_limit() -> None:
    a = parse("limit", "12", "-d", "unlimited")
    assert a.download == 0 and a.upload is None


def test_json_before_or_after_the_command() -> None:
    assert parse("stats", "1").json is False
    assert parse("stats", "1", "--json").json is True
    assert parse("--json", "stats", "1").json is True
    assert parse("--json", "list").json is True
    assert parse("top", "--json").json is True
    assert parse("info", "--json").json is True


def test_run_strips_the_separator_and_keeps_command_options() -> None:
    a = parse("run", "-d", "1M", "--", "curl", "-d", "x", "-o", "/dev/null")
    assert a.command == ["curl", "-d", "x", "-o", "/dev/null"]
    assert (a.download, a.upload) == (1_000_000, None)
    a = parse("run", "-u", "2M", "sh", "-c", "exit 3")
    assert a.command == ["sh", "-c", "exit 3"]


def test_run_errors(capsys) -> None:
    assert "after --" in usage_error(capsys, "run", "-d", "1M")
    assert "after --" in usage_error(capsys, "run", "-d", "1M", "--")
    assert "give a download" in usage_error(capsys, "run", "--", "true")
    assert "would not limit" in usage_error(capsys, "run", "-d", "0", "--", "true")


def test_unit_subcommands() -> None:
    a = parse("unit", "limit", "firefox.scope", "-d", "2M")
    assert (a.cmd, a.unit_cmd, a.unit, a.download, a.upload) == (
        "unit", "limit", "firefox.scope", 2_000_000, None)
    a = parse("unit", "clear", "system.slice/foo.service")
    assert (a.unit_cmd, a.unit) == ("clear", "system.slice/foo.service")


def test_unit_needs_its_subcommand(capsys) -> None:
    usage_error(capsys, "unit")
    usage_error(capsys, "unit", "limit", "x.scope")


def test_top_options(capsys) -> None:
    a = parse("top", "-i", "0.5", "-n", "3")
    assert (a.interval, a.iterations) == (0.5, 3)
    assert parse("top").interval == 1.0
    assert "between" in usage_error(capsys, "top", "-i", "0")
    usage_error(capsys, "top", "-n", "0")


def test_unknown_command_and_no_command(capsys) -> None:
    usage_error(capsys, "frobnicate")
    usage_error(capsys)


def test_help_states_the_unit_rule_exit_codes_and_json_keys(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for needle in ("decimal bytes", "binary bytes", "decimal bits", "ambiguous",
                   "exit codes", "download_rate", "program_calls", "systemctl start"):
        assert needle in out
    with pytest.raises(SystemExit):
        main(["limit", "--help"])
    assert "decimal bytes" in capsys.readouterr().out


def test_completion_command_prints_scripts(capsys) -> None:
    assert main(["completion", "bash"]) == 0
    assert "complete -F _chadthrottlectl chadthrottlectl" in capsys.readouterr().out
    assert main(["completion", "zsh"]) == 0
    assert "bashcompinit" in capsys.readouterr().out


def test_unreachable_bus_is_exit_1_with_a_plain_hint(capsys, tmp_path) -> None:
    code = main(["--bus", f"unix:path={tmp_path}/no-such-socket", "list"])
    assert code == EXIT_DAEMON
    err = capsys.readouterr().err
    assert "systemctl start chadthrottled" in err
    assert "[org.chadthrottle.Throttle1.Client.NoBus]" in err


def test_the_cli_is_a_bus_client_only() -> None:
    """DESIGN §4: the CLI never imports the engine, the service or the server."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import chadthrottle

    src = str(Path(chadthrottle.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    code = ("import sys, chadthrottle.cli.main, chadthrottle.cli.top, chadthrottle.cli.run; "
            "print(sorted(m for m in sys.modules if m.startswith('chadthrottle.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout
    assert "chadthrottle.cli.client" in out
    for forbidden in ("chadthrottle.engine", "chadthrottle.service", "chadthrottle.server",
                      "chadthrottle.libbpf", "chadthrottle.bpfobject"):
        assert forbidden not in out
