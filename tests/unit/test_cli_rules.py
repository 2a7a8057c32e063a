"""chadthrottlectl rule add|list|remove|reload: parsing, the a{sv} it sends, its messages,
and the RULE columns of list and top (issue 9; no daemon needed)."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess

import pytest
from dbus_fast import Message
from dbus_fast._private.unmarshaller import Unmarshaller
from rich.console import Console

from chadthrottle import names
from chadthrottle.cli import client, render
from chadthrottle.cli import rules as rulecli
from chadthrottle.cli.client import DaemonError, rule_variants
from chadthrottle.cli.completion import script, walk
from chadthrottle.cli.main import EXIT_USAGE, build_parser, check_args
from chadthrottle.rules.model import Rule


def parse(*argv: str):
    args = build_parser().parse_args(list(argv))
    check_args(args)
    return args


def usage_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as info:
        parse(*argv)
    assert info.value.code == EXIT_USAGE
    return capsys.readouterr().err


def complete(words: list[str]) -> list[str]:
    """Source the bash script, call its function as bash would, return COMPREPLY."""
    quoted = " ".join(f"'{w}'" for w in words)
    prog = script("bash", build_parser()) + f"""
COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}
_chadthrottlectl
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    out = subprocess.run(["bash", "--norc", "--noprofile"], input=prog, capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return [w for w in out.splitlines() if w]


def text_of(renderable) -> str:
    buf = io.StringIO()
    Console(file=buf, width=200, force_terminal=False, color_system=None, markup=False,
            highlight=False).print(renderable)
    return buf.getvalue()


# --- parsing ----------------------------------------------------------------------------------
def test_the_issue_examples_parse_into_rules() -> None:
    a = parse("rule", "add", "--exe", "/usr/lib/steam/*", "--per-app", "-d", "5M",
              "--permanent")
    assert rulecli.rule_from_args(a) == {"exe": "/usr/lib/steam/*", "scope": "application",
                                         "download": 5_000_000, "permanent": True}
    a = parse("rule", "add", "--name", "wget", "-d", "500K", "--label", "slow wget")
    assert rulecli.rule_from_args(a) == {"comm": "wget", "download": 500_000,
                                         "name": "slow wget"}
    a = parse("rule", "add", "--cmdline", r"rsync .*--server", "-u", "1M", "--disabled",
              "--id", "rsync")
    assert rulecli.rule_from_args(a) == {"cmdline": r"rsync .*--server", "upload": 1_000_000,
                                         "enabled": False, "id": "rsync"}
    a = parse("rule", "add", "--unit", "backup.service", "-u", "1M", "-d", "0")
    assert rulecli.rule_from_args(a) == {"unit": "backup.service", "upload": 1_000_000,
                                         "download": 0}
    a = parse("rule", "add", "--user", "root", "-d", "2M")
    assert rulecli.rule_from_args(a) == {"uid": 0, "download": 2_000_000}
    # what the CLI builds is a valid rule for the daemon's model
    for argv in (["--exe", "/usr/lib/steam/*", "--per-app", "-d", "5M", "--permanent"],
                 ["--name", "wget", "-d", "500K"], ["--user", "0", "-u", "1M"]):
        Rule.from_bus(rulecli.rule_from_args(parse("rule", "add", *argv)))


def test_users_by_name_or_number() -> None:
    assert rulecli.user_arg("root") == 0
    assert rulecli.user_arg("4000000") == 4_000_000  # no user has that name: a uid
    fake = {"alice": type("P", (), {"pw_uid": 1001})()}
    assert rulecli.user_arg("alice", lookup=fake.__getitem__) == 1001
    with pytest.raises(Exception, match="no such user"):
        rulecli.user_arg("no-such-user-here")
    with pytest.raises(Exception, match="no such user"):
        rulecli.user_arg(str(2**32))


def test_rule_usage_errors(capsys) -> None:
    assert "at least one match key" in usage_error(capsys, "rule", "add", "-d", "1M")
    assert "not 0" in usage_error(capsys, "rule", "add", "--name", "wget")
    assert "not 0" in usage_error(capsys, "rule", "add", "--name", "wget", "-d", "0")
    assert "no such user" in usage_error(capsys, "rule", "add", "--user", "no-such-user-x",
                                         "-d", "1M")
    assert "ambiguous" in usage_error(capsys, "rule", "add", "--name", "x", "-d", "10Mb")
    assert "ID" in usage_error(capsys, "rule", "remove")
    usage_error(capsys, "rule")


def test_list_remove_reload_parse() -> None:
    assert parse("rule", "list").json is False
    assert parse("rule", "list", "--json").json is True
    assert parse("--json", "rule", "list").json is True
    assert parse("rule", "list", "-q").quiet is True
    assert parse("rule", "remove", "steam").rule_id == "steam"
    assert parse("rule", "reload").rule_cmd == "reload"


# --- what goes on the bus ---------------------------------------------------------------------
def test_add_rule_sends_each_key_in_its_contract_type() -> None:
    rule = {"id": "steam", "name": "Steam", "exe": "/usr/lib/steam/*", "comm": "steam",
            "cmdline": "x", "uid": 1000, "unit": "a.service", "scope": "application",
            "download": 5_000_000, "upload": 0, "permanent": True, "enabled": False}
    variants = rule_variants(rule)
    want = {"id": "s", "name": "s", "exe": "s", "comm": "s", "cmdline": "s", "uid": "u",
            "unit": "s", "scope": "s", "download": "t", "upload": "t", "permanent": "b",
            "enabled": "b"}
    assert {k: v.signature for k, v in variants.items()} == want
    # through the wire format and back, as the daemon will read it
    msg = Message(destination=names.BUS_NAME, path=names.OBJECT_PATH,
                  interface=names.INTERFACE, member="AddRule", signature="a{sv}",
                  body=[variants], serial=1)
    reader = Unmarshaller(io.BytesIO(msg._marshall(False)))
    reader.unmarshall()
    (body,) = reader.message.body
    assert {k: (v.signature, v.value) for k, v in body.items()} == \
        {k: (want[k], rule[k]) for k in rule}


@pytest.mark.parametrize("rule", [{"matched": 1}, {"colour": "red"}, {"uid": "1000"},
                                  {"uid": True}, {"download": 1.5}, {"enabled": 1},
                                  {"exe": 5}])
def test_add_rule_refuses_what_the_contract_does_not_say(rule: dict) -> None:
    with pytest.raises(ValueError):
        rule_variants(rule)


def test_rule_errors_are_plain_sentences() -> None:
    x = client.explain
    assert x(names.ERR_INVALID_RULE, "key 'uid': must be an integer") == \
        "invalid rule: key 'uid': must be an integer"
    assert x(names.ERR_NO_SUCH_RULE, "no rule with id 'x'") == "no such rule: no rule with id 'x'"
    assert x(names.ERR_NO_SUCH_RULE, "", rule="x") == "no such rule: 'x'"
    msg = x(names.ERR_NOT_AUTHORIZED, "", action=names.POLKIT_ACTION_MANAGE_RULES)
    assert names.POLKIT_ACTION_MANAGE_RULES in msg and "limit-own" not in msg
    assert names.POLKIT_ACTION_MANAGE_RULES in x(client.DBUS_ACCESS_DENIED, "",
                                                 action=names.POLKIT_ACTION_MANAGE_RULES)
    assert "older" in x(client.DBUS_UNKNOWN_METHOD, 'No such method "AddRule"')


# --- rendering --------------------------------------------------------------------------------
LISTED = [
    {"id": "wget", "comm": "wget", "download": 51200, "upload": 0, "scope": "process",
     "permanent": False, "enabled": True, "name": "", "matched": 2},
    {"id": "steam", "exe": "/usr/lib/steam/*", "download": 5_000_000, "upload": 0,
     "scope": "application", "permanent": True, "enabled": False, "name": "Steam \x1b[31mred",
     "matched": 0, "future_key": 1},
]


def test_rule_list_json_has_stable_keys_sorted_by_id() -> None:
    rows = rulecli.rules_json(LISTED)
    assert [r["id"] for r in rows] == ["steam", "wget"]
    assert rulecli.RULE_JSON_KEYS == ("id", "name", "exe", "comm", "cmdline", "uid", "unit",
                                      "scope", "download", "upload", "permanent", "enabled",
                                      "matched")
    assert tuple(rows[1]) == rulecli.RULE_JSON_KEYS
    assert tuple(rows[0])[:-1] == rulecli.RULE_JSON_KEYS and rows[0]["future_key"] == 1
    assert rows[1]["exe"] is None and rows[1]["uid"] is None
    assert json.loads(render.dumps(rows)) == rows


def test_rule_table_escapes_control_characters() -> None:
    text = text_of(rulecli.rules_table(LISTED))
    for header in ("ID", "MATCH", "SCOPE", "DOWNLOAD", "UPLOAD", "KEPT", "PROCS", "LABEL"):
        assert header in text
    assert "exe=/usr/lib/steam/*" in text and "comm=wget" in text
    assert "per app" in text and "per process" in text and "permanent, disabled" in text
    assert "5 MB/s" in text and "50 KiB/s" in text and "unlimited" in text
    assert "\x1b" not in text and "Steam \\x1b[31mred" in text
    assert rulecli.display("a\nb\x07c\x9b") == "a\\x0ab\\x07c\\x9b"


def test_rule_summary_and_match_text() -> None:
    assert rulecli.match_text({"uid": 0, "comm": "x"}) == "comm=x uid=0(root)"
    assert rulecli.rule_summary({"exe": "/usr/lib/steam/*", "scope": "application",
                                 "download": 5_000_000}) == \
        "exe=/usr/lib/steam/*, one budget for all, download 5 MB/s, upload unlimited"
    assert rulecli.rule_summary({"comm": "w\x1b", "upload": 1024, "enabled": False}) == \
        "comm=w\\x1b, a budget per process, download unlimited, upload 1 KiB/s, disabled"


def test_list_shows_a_rule_column_only_when_a_limit_has_a_rule() -> None:
    limits = [(20, 0, 2048), (10, 51200, 0)]
    comms = {10: "wget", 20: "curl"}
    old = render.list_json(limits, comms)  # a daemon that does not report rules
    assert all(tuple(r) == render.LIST_KEYS for r in old)
    assert "RULE" not in text_of(render.list_table(old))
    none = render.list_json(limits, comms, {10: "", 20: ""})
    assert [r["rule"] for r in none] == ["", ""]
    assert "RULE" not in text_of(render.list_table(none))
    some = render.list_json(limits, comms, {10: "wget-rule"})
    assert [r["rule"] for r in some] == ["wget-rule", ""]
    text = text_of(render.list_table(some))
    assert "RULE" in text and "wget-rule" in text


def test_top_shows_a_rule_column_when_the_daemon_reports_rules() -> None:
    row = {"pid": 5, "comm": "wget", "download_rate": 10.0, "upload_rate": 0.0,
           "download_limit": 51200, "upload_limit": 0, "status": "throttled"}
    assert "RULE" not in text_of(render.top_table([row]))
    text = text_of(render.top_table([{**row, "rule": "evil\x1b]0;x"},
                                     {**row, "pid": 6, "rule": ""}]))
    assert "RULE" in text and "evil\\x1b]0;x" in text and "\x1b" not in text
    assert render.top_json([{**row, "rule": "r"}])[0]["rule"] == "r"


class RecordingClient:
    """Answers ListProcesses/GetStats from tables; records the GetStats calls."""

    def __init__(self, rows: list[dict], stats: dict[int, dict]) -> None:
        self.rows, self.stats, self.asked = rows, stats, []

    async def list_processes(self) -> list[dict]:
        return self.rows

    async def get_stats(self, pid: int) -> dict:
        self.asked.append(pid)
        if pid not in self.stats:
            raise DaemonError(names.ERR_NO_SUCH_PROCESS, "gone")
        return self.stats[pid]


def test_rules_of_uses_list_processes_then_get_stats() -> None:
    c = RecordingClient([{"pid": 1, "rule": "a"}, {"pid": 2, "rule": ""}],
                        {3: {"pid": 3, "rule": "b"}})
    assert asyncio.run(rulecli.rules_of(c, [1, 2, 3, 4])) == {1: "a", 2: "", 3: "b"}
    assert c.asked == [3, 4]
    older = RecordingClient([{"pid": 1}], {2: {"pid": 2}})
    assert asyncio.run(rulecli.rules_of(older, [1, 2])) is None and older.asked == []
    idle = RecordingClient([], {p: {"pid": p} for p in range(2, 60)})  # no traffic
    assert asyncio.run(rulecli.rules_of(idle, list(range(2, 60)))) is None
    assert idle.asked == [2]  # one GetStats tells an older daemon
    assert asyncio.run(rulecli.rules_of(idle, [])) == {}
    gone_first = RecordingClient([], {3: {"pid": 3, "rule": "r"}, 4: {"pid": 4, "rule": ""}})
    assert asyncio.run(rulecli.rules_of(gone_first, [2, 3, 4])) == {3: "r", 4: ""}


# --- completion -------------------------------------------------------------------------------
def test_completion_knows_the_rule_commands() -> None:
    nodes = {n.path: n for n in walk(build_parser())}
    assert nodes["rule"].commands == ["add", "list", "remove", "reload"]
    assert nodes["rule remove"].positional == "rule"
    assert {"--exe", "--name", "--cmdline", "--user", "--unit", "--label", "--id"} <= \
        set(nodes["rule add"].value_options)
    assert complete(["chadthrottlectl", "rule", ""]) == ["add", "list", "remove", "reload"]
    assert "--per-app" in complete(["chadthrottlectl", "rule", "add", "--p"])
    assert "root" in complete(["chadthrottlectl", "rule", "add", "--user", "ro"])
    assert "/usr" in complete(["chadthrottlectl", "rule", "add", "--exe", "/us"])
    assert complete(["chadthrottlectl", "rule", "add", "--label", "x"]) == []
