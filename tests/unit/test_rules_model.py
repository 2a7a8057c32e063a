"""The rule model: strict validation whose errors name the key, conversions bus <-> model <->
TOML, ids, and the precedence among rules (issue 9)."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chadthrottle import names
from chadthrottle.errors import InvalidRule, NoSuchRule
from chadthrottle.rules import glob
from chadthrottle.rules.model import (
    FILE_KEYS,
    RULE_KEYS,
    UID_MAX,
    Rule,
    make_id,
    precedence_key,
    slug,
)
from chadthrottle.rules.ruleset import RuleSet

STEAM = {"name": "Steam downloads", "exe": "/usr/lib/steam/*", "scope": "application",
         "download": 5_000_000}


def invalid(data: dict) -> InvalidRule:
    with pytest.raises(InvalidRule) as info:
        Rule.from_bus(data)
    return info.value


# --- validation: every error names its key ----------------------------------------------------
@pytest.mark.parametrize(("data", "key", "words"), [
    ({**STEAM, "colour": "red"}, "colour", "unknown key 'colour'"),
    ({"uid": "1000", "download": 5000}, "uid", "must be an integer, not a string '1000'"),
    ({"uid": True, "download": 5000}, "uid", "must be an integer, not a boolean"),
    ({"uid": -1, "download": 5000}, "uid", "between 0 and"),
    ({"uid": UID_MAX + 1, "download": 5000}, "uid", "between 0 and"),
    ({**STEAM, "enabled": 1}, "enabled", "must be true or false"),
    ({**STEAM, "permanent": "yes"}, "permanent", "must be true or false"),
    ({**STEAM, "download": 5e6}, "download", "must be an integer, not a number"),
    ({**STEAM, "download": "5M"}, "download", "must be an integer"),
    ({**STEAM, "download": 100}, "download", "1024"),
    ({**STEAM, "upload": 2**40 + 1}, "upload", "1024"),
    ({**STEAM, "scope": "app"}, "scope", "'process' or 'application'"),
    ({**STEAM, "exe": "usr/bin/x"}, "exe", "absolute path"),
    ({**STEAM, "exe": "/usr//bin/x"}, "exe", "empty path component"),
    ({**STEAM, "exe": "/usr/bin/../x"}, "exe", "'..'"),
    ({**STEAM, "exe": "/usr/bin/"}, "exe", "not a directory"),
    ({**STEAM, "exe": "/opt/a**/x"}, "exe", "whole path component"),
    ({**STEAM, "exe": ""}, "exe", "must not be empty"),
    ({**STEAM, "exe": 5}, "exe", "must be a string"),
    ({"comm": "gnome-software-service", "download": 5000}, "comm", "'gnome-software-'"),
    ({"comm": "", "download": 5000}, "comm", "must not be empty"),
    ({"comm": "a\nb", "download": 5000}, "comm", "control characters"),
    ({"cmdline": "(unclosed", "download": 5000}, "cmdline", "not a valid regular expression"),
    ({"unit": "/", "download": 5000}, "unit", "every process"),
    ({"unit": "/system.slice/../x", "download": 5000}, "unit", "'..'"),
    ({"unit": "foo bar", "download": 5000}, "unit", "not a systemd unit name"),
    ({**STEAM, "name": "x\x1b[31m"}, "name", "control characters"),
    ({**STEAM, "id": "Steam Downloads"}, "id", "a-z 0-9"),
    ({"download": 5000}, "exe, comm, cmdline, uid, unit", "at least one match key"),
    ({"name": "only a label", "download": 5000}, "exe, comm, cmdline, uid, unit",
     "at least one match key"),
    ({"comm": "wget"}, "download, upload", "both 0"),
    ({"comm": "wget", "download": 0, "upload": 0}, "download, upload", "both 0"),
])
def test_every_error_names_its_key(data: dict, key: str, words: str) -> None:
    e = invalid(data)
    assert e.key == key
    assert words in str(e)
    assert e.source is None
    if "," not in key:
        assert f"'{key}'" in str(e)


def test_several_errors_are_all_reported() -> None:
    e = invalid({"exe": "rel", "uid": "0", "download": 1})
    assert e.key == "exe"
    for key in ("'exe'", "'uid'", "'download'"):
        assert key in str(e)


def test_defaults_and_valid_rule() -> None:
    r = Rule.from_bus(STEAM)
    assert (r.scope, r.permanent, r.enabled, r.upload, r.id) == ("application", False, True,
                                                               0, None)
    assert r.match_keys == ("exe",)
    assert r.exe_is_glob
    assert r.model_config["frozen"]
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
        r.download = 1  # type: ignore[misc]


def test_keys_match_the_contract() -> None:
    assert RULE_KEYS == ("name", "exe", "comm", "cmdline", "uid", "unit", "scope", "download",
                         "upload", "permanent", "enabled")
    assert set(RULE_KEYS) == set(names.RULE_KEY_SIGNATURES)
    assert "permanent" not in FILE_KEYS and "id" not in FILE_KEYS
    assert names.POLKIT_ACTION_MANAGE_RULES == "org.chadthrottle.throttle.manage-rules"
    assert names.ERR_INVALID_RULE.endswith(".Error.InvalidRule")
    assert names.ERR_NO_SUCH_RULE.endswith(".Error.NoSuchRule")


def test_unit_names_and_paths_are_accepted() -> None:
    for unit in ("backup.service", "user@1000.service", "system-getty.slice",
                 "/system.slice/backup.service", "system.slice/backup.service"):
        assert Rule.from_bus({"unit": unit, "upload": 1_000_000}).unit == unit


def test_comm_of_fifteen_bytes_is_the_limit() -> None:
    assert Rule.from_bus({"comm": "gnome-software-", "download": 1024}).comm == "gnome-software-"
    assert invalid({"comm": "é" * 8, "download": 1024}).key == "comm"  # 16 bytes


# --- files ------------------------------------------------------------------------------------
def test_the_design_example_file() -> None:
    text = ('# /etc/chadthrottle/rules.d/steam.toml\nname = "Steam downloads"\n'
            'exe = "/usr/lib/steam/*"\nscope = "application"\ndownload = 5_000_000\n')
    r = Rule.from_toml(text, "steam", "/etc/chadthrottle/rules.d/steam.toml")
    assert (r.id, r.permanent, r.download, r.scope) == ("steam", True, 5_000_000, "application")


@pytest.mark.parametrize(("text", "key", "words"), [
    ('comm = "wget"\ndownload = 5M\n', "download", "not valid TOML"),
    ('comm = "wget"\ndownload = 50000\npermanent = true\n', "permanent", "a file is a permanent"),
    ('comm = "wget"\ndownload = 50000\nid = "x"\n', "id", "the file name is the id"),
    ('comm = "wget"\ndownload = 50000\nuid = "1000"\n', "uid", "must be an integer"),
    ('comm = "wget"\ndownload = 50000\n[extra]\na = 1\n', "extra", "unknown key"),
    ('comm = "wget"\ndownload = 50000\nenabled = "yes"\n', "enabled", "true or false"),
])
def test_file_errors_name_the_file_and_the_key(text: str, key: str, words: str) -> None:
    with pytest.raises(InvalidRule) as info:
        Rule.from_toml(text, "wget", "/etc/chadthrottle/rules.d/wget.toml")
    e = info.value
    assert str(e).startswith("/etc/chadthrottle/rules.d/wget.toml: ")
    assert f"'{key}'" in str(e) and words in str(e)
    assert (e.key, e.source) == (key, "/etc/chadthrottle/rules.d/wget.toml")


def test_to_toml_has_no_id_nor_permanent_and_reads_back() -> None:
    r = Rule.from_bus({**STEAM, "id": "steam", "permanent": True})
    text = r.to_toml()
    data = tomllib.loads(text)
    assert "id" not in data and "permanent" not in data
    assert text.startswith("#")
    assert Rule.from_toml(text, "steam", "steam.toml") == r


# --- round trips (hypothesis) -----------------------------------------------------------------
_component = st.from_regex(r"[A-Za-z0-9_.+\[\] -]{1,8}", fullmatch=True).filter(
    lambda c: c not in (".", ".."))
_glob_component = st.one_of(
    _component, st.just("**"),
    st.from_regex(r"[A-Za-z0-9_.]{0,4}[*?][A-Za-z0-9_.]{0,4}", fullmatch=True))
_exe = st.lists(st.one_of(_component, _glob_component), min_size=1, max_size=5).map(
    lambda parts: "/" + "/".join(parts))
_rate = st.one_of(st.just(0), st.integers(names.RATE_MIN, names.RATE_MAX))
_unit = st.one_of(
    st.from_regex(r"[A-Za-z0-9:_@-]{1,12}\.(service|scope|slice)", fullmatch=True),
    st.lists(st.from_regex(r"[a-z0-9_.@-]{1,8}", fullmatch=True).filter(
        lambda c: c not in (".", "..")), min_size=1, max_size=4).map(lambda p: "/" + "/".join(p)))
_optional = {
    "name": st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30),
    "exe": _exe,
    "comm": st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), min_size=1,
                    max_size=15),
    "cmdline": st.text(st.characters(blacklist_categories=("Cs",)), min_size=1,
                       max_size=20).map(lambda t: "^" + __import__("re").escape(t)),
    "uid": st.integers(0, UID_MAX),
    "unit": _unit,
    "scope": st.sampled_from(["process", "application"]),
    "download": _rate,
    "upload": _rate,
    "permanent": st.booleans(),
    "enabled": st.booleans(),
}
bus_rules = st.fixed_dictionaries({}, optional=_optional).filter(
    lambda d: any(k in d for k in names.RULE_MATCH_KEYS) and (d.get("download")
                                                             or d.get("upload")))


@settings(max_examples=300, deadline=None)
@given(bus_rules)
def test_bus_model_toml_round_trip(data: dict) -> None:
    rule = Rule.from_bus(data)
    out = rule.to_bus()
    assert {k: v for k, v in out.items() if k in data} == data
    assert Rule.from_bus(out) == rule
    rid = make_id(rule)
    text = rule.with_id(rid).to_toml()
    back = Rule.from_toml(text, rid, f"{rid}.toml")
    assert back == rule.model_copy(update={"id": rid, "permanent": True})
    assert {k: v for k, v in back.to_bus().items() if k not in ("id", "permanent")} == \
        {k: v for k, v in out.items() if k != "permanent"}


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8),
                                                       st.booleans(), st.floats()),
                       max_size=6))
def test_arbitrary_input_is_a_rule_or_invalid_rule(data: dict) -> None:
    try:
        Rule.from_bus(data)
    except InvalidRule as e:
        assert e.key is None or "," in e.key or repr(e.key) in str(e)
    # anything else raised fails the test


# --- ids --------------------------------------------------------------------------------------
def test_ids_come_from_the_name_then_the_keys_and_are_unique() -> None:
    assert slug("Steam downloads") == "steam-downloads"
    assert slug("  Café / Ünïcode!! ") == "cafe-unicode"
    assert slug("...") == ""
    assert make_id(Rule.from_bus(STEAM)) == "steam-downloads"
    assert make_id(Rule.from_bus(STEAM), {"steam-downloads", "steam-downloads-2"}) == \
        "steam-downloads-3"
    no_name = {k: v for k, v in STEAM.items() if k != "name"}
    assert make_id(Rule.from_bus(no_name)) == "steam"
    assert make_id(Rule.from_bus({"comm": "wget", "download": 1024})) == "wget"
    assert make_id(Rule.from_bus({"uid": 1001, "download": 1024})) == "uid-1001"
    assert make_id(Rule.from_bus({"unit": "/system.slice/backup.service",
                                  "upload": 1024})) == "backup.service"
    assert make_id(Rule.from_bus({"cmdline": "x", "upload": 1024, "name": "!!"})) == "cmdline"
    long = Rule.from_bus({"comm": "x", "download": 1024, "name": "a" * 100})
    rid = make_id(long, {"a" * 64})
    assert len(rid) <= 64 and rid.endswith("-2")
    assert Rule.from_bus({**STEAM, "id": rid}).id == rid


def test_ruleset_is_immutable_and_keeps_ids_unique() -> None:
    empty = RuleSet()
    one = empty.put(Rule.from_bus(STEAM))
    two = one.put(Rule.from_bus(STEAM))
    assert len(empty) == 0 and list(one) == ["steam-downloads"]
    assert list(two) == ["steam-downloads", "steam-downloads-2"]
    changed = two.put(Rule.from_bus({**STEAM, "id": "steam-downloads", "download": 1024}))
    assert changed["steam-downloads"].download == 1024 and len(changed) == 2
    assert two["steam-downloads"].download == 5_000_000
    assert list(two.remove("steam-downloads-2")) == ["steam-downloads"]
    with pytest.raises(NoSuchRule):
        two.remove("nope")
    with pytest.raises(InvalidRule):
        RuleSet([Rule.from_bus({**STEAM, "id": "a"}), Rule.from_bus({**STEAM, "id": "a"})])


def test_reload_keeps_runtime_rules_and_refuses_a_taken_id() -> None:
    runtime = Rule.from_bus({"comm": "wget", "download": 1024, "id": "wget"})
    old_file = Rule.from_bus({**STEAM, "id": "steam", "permanent": True})
    rules = RuleSet([runtime, old_file])
    new_file = Rule.from_bus({"comm": "curl", "download": 1024, "id": "curl", "permanent": True})
    after = rules.with_permanent([new_file])
    assert list(after) == ["curl", "wget"]
    clash = Rule.from_bus({"comm": "x", "download": 1024, "id": "wget", "permanent": True})
    with pytest.raises(InvalidRule) as info:
        rules.with_permanent([clash])
    assert "wget.toml" in str(info.value) and info.value.key == "id"


# --- precedence -------------------------------------------------------------------------------
def rule(rid: str, **keys) -> Rule:
    return Rule.from_bus({"download": 1024, **keys, "id": rid})


def test_precedence_more_keys_then_exact_exe_then_literal_glob_then_id() -> None:
    rules = [
        rule("a-comm", comm="steam"),
        rule("b-glob-short", exe="/usr/*/steam/*"),
        rule("c-glob-long", exe="/usr/lib/steam/*"),
        rule("d-exact", exe="/usr/lib/steam/steam"),
        rule("e-two-keys", exe="/usr/lib/steam/*", uid=1000),
        rule("f-uid", uid=1000),
        rule("0-uid", uid=1000),
    ]
    order = [r.id for r in sorted(rules, key=precedence_key)]
    assert order == ["e-two-keys", "d-exact", "c-glob-long", "b-glob-short", "0-uid", "a-comm",
                     "f-uid"]
    ordered = [r.id for r in RuleSet(rules).ordered()]
    assert ordered == order
    disabled = RuleSet([*rules[:-1], rule("0-uid", uid=1000, enabled=False)])
    assert "0-uid" not in [r.id for r in disabled.ordered()]


def test_glob_semantics() -> None:
    assert glob.matches("/usr/lib/steam/*", "/usr/lib/steam/steam")
    assert not glob.matches("/usr/lib/steam/*", "/usr/lib/steam/ubuntu12_32/steam")
    assert glob.matches("/usr/lib/steam/**", "/usr/lib/steam/ubuntu12_32/steam")
    assert glob.matches("/usr/lib/steam/**", "/usr/lib/steam/steam")
    assert not glob.matches("/usr/lib/steam/**", "/usr/lib/steam")
    assert glob.matches("/opt/**/bin/tool", "/opt/bin/tool")
    assert glob.matches("/opt/**/bin/tool", "/opt/a/b/bin/tool")
    assert not glob.matches("/opt/**/bin/tool", "/opt/a/b/bin/tool2")
    assert glob.matches("/usr/bin/python3.?", "/usr/bin/python3.9")
    assert not glob.matches("/usr/bin/python3.?", "/usr/bin/python3.11")
    assert glob.matches("/usr/bin/*", "/usr/bin/.hidden")
    assert glob.matches("/opt/[x]/a", "/opt/[x]/a")  # brackets are literal
    assert not glob.matches("/opt/[x]/a", "/opt/x/a")
    assert glob.matches("/usr/bin/wget", "/usr/bin/wget")
    assert not glob.matches("/usr/bin/wget", "/usr/bin/wget2")
    assert glob.literal_dir("/usr/lib/steam/*") == "/usr/lib/steam"
    assert glob.literal_dir("/opt/*/bin/x") == "/opt"
    assert glob.literal_dir("/x") == "/"
