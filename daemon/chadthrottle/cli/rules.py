"""``chadthrottlectl rule add|list|remove|reload``: rules that outlive a pid (issue 9).

A bus client only, like the rest of the CLI: the daemon validates every rule (the same
model for files and the bus) and its InvalidRule message names the key.  The parts that
need no bus are plain functions: the parser, the rule a command line describes
(:func:`rule_from_args`), and the rendering (:func:`rules_json`, :func:`rules_table`,
:func:`rule_summary`, :func:`display`).

``rule list --json`` prints a list sorted by id, each object with the stable keys
:data:`RULE_JSON_KEYS` (the rule keys, ``id`` and ``matched``; a key the rule does not have
is null); keys a later daemon adds follow them.
"""

from __future__ import annotations

import argparse
import asyncio
import pwd
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from chadthrottle import names
from chadthrottle.cli.client import Client, DaemonError
from chadthrottle.units import format_limit

UID_MAX = 2**32 - 2
RULE_JSON_KEYS: tuple[str, ...] = ("id", *names.RULE_KEY_SIGNATURES, "matched")
STATS_RULE_KEY = "rule"
#: at most this many GetStats calls to learn the rule of limited processes without traffic
MAX_STATS_CALLS = 2000
STATS_BATCH = 50
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


# --- safe text --------------------------------------------------------------------------------
def display(value: Any) -> str:
    """Text for a terminal: control characters (escape sequences, newlines) are shown as
    ``\\xNN`` instead of acting.  The one place rule output is escaped."""
    text = "" if value is None else str(value)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def cell(value: Any, style: str = "") -> Text:
    """A table cell that is never parsed as markup and never moves the cursor."""
    return Text(display(value), style=style)


# --- argument types ---------------------------------------------------------------------------
def user_arg(text: str, lookup: Callable[[str], Any] = pwd.getpwnam) -> int:
    """A user name or a uid -> uid (resolved here, on the client: the daemon only sees uids)."""
    try:
        return lookup(text).pw_uid
    except KeyError:
        pass
    if text.isdigit():
        uid = int(text)
        if uid <= UID_MAX:
            return uid
    raise argparse.ArgumentTypeError(f"no such user: {text!r} (give a user name or a uid)")


def add_parser(sub: argparse._SubParsersAction, *, json_parent: argparse.ArgumentParser,
               rate_options: Callable[[argparse.ArgumentParser, str], None],
               epilog: str) -> argparse._SubParsersAction:
    """The ``rule`` command group; returns its subparsers (for set_defaults(parser=...))."""
    fmt = argparse.RawDescriptionHelpFormatter
    sp = sub.add_parser(
        "rule", help="rules: limits by program, name, command line, user or unit",
        description="Rules limit every process they match, now and in the future, and "
                    "survive a daemon restart (runtime rules) or a reboot (--permanent).")
    rsub = sp.add_subparsers(dest="rule_cmd", metavar="COMMAND", required=True)

    ap = rsub.add_parser(
        "add", formatter_class=fmt, epilog=epilog, help="add a rule",
        description="Add a rule: every process that matches all the keys given is limited,\n"
                    "now and when it starts later. Each matching process (with its children)\n"
                    "gets its own budget; with --per-app all of them share one. Examples:\n\n"
                    "  chadthrottlectl rule add --exe '/usr/lib/steam/*' --per-app -d 5M "
                    "--permanent\n"
                    "  chadthrottlectl rule add --name wget -d 500K\n"
                    "  chadthrottlectl rule add --user alice -d 2M -u 1M\n"
                    "  chadthrottlectl rule add --unit backup.service -u 1M --permanent")
    match = ap.add_argument_group("match keys (at least one; all given must hold)")
    match.add_argument("--exe", metavar="PATTERN",
                       help="absolute path of the executable; * and ? match inside one path "
                            "component, ** any number of directories")
    match.add_argument("--name", dest="comm", metavar="COMM",
                       help="the process name (comm) exactly, at most 15 bytes")
    match.add_argument("--cmdline", metavar="REGEX",
                       help="a regular expression searched in the arguments joined by spaces")
    match.add_argument("--user", dest="uid", type=user_arg, metavar="USER",
                       help="the user running the process: a name or a uid")
    match.add_argument("--unit", metavar="UNIT",
                       help="a systemd unit name (processes in it or below) or a cgroup path")
    rate_options(ap, "")
    ap.add_argument("--per-app", dest="per_app", action="store_true",
                    help="all matching processes share one budget (scope 'application'); "
                         "by default each gets its own (scope 'process')")
    ap.add_argument("--permanent", action="store_true",
                    help="keep the rule across reboots (a file in the daemon's rules.d); "
                         "otherwise it lasts until reboot")
    ap.add_argument("--disabled", action="store_true", help="add the rule switched off")
    ap.add_argument("--label", metavar="TEXT", help="a label for people (the rule's name)")
    ap.add_argument("--id", dest="rule_id", metavar="ID",
                    help="the rule's id (a-z 0-9 _ . -); default: made from the label or the "
                         "match keys. An existing id is replaced: how a rule is changed")

    lp = rsub.add_parser("list", parents=[json_parent], help="every rule",
                         description="List every rule with the number of processes it limits "
                                     "now.")
    lp.add_argument("-q", "--quiet", action="store_true", help="print the ids only")

    rp = rsub.add_parser("remove", help="remove a rule (its processes are freed at once)",
                         description="Remove a rule; the processes it limited are freed at "
                                     "once. A permanent rule's file is deleted.")
    rp.add_argument("rule_id", metavar="ID", help="the rule's id (see 'rule list')")

    rsub.add_parser("reload", help="re-read the permanent rules from disk",
                    description="Re-read the daemon's rules.d (as SIGHUP and 'systemctl "
                                "reload chadthrottled' do). A broken file is refused as a "
                                "whole and the rules in force stay.")
    return rsub


def check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Usage rules of ``rule add`` that argparse cannot express (parser.error exits 2)."""
    if args.rule_cmd != "add":
        return
    if all(getattr(args, k) is None for k in ("exe", "comm", "cmdline", "uid", "unit")):
        parser.error("give at least one match key: --exe, --name, --cmdline, --user or --unit")
    if not args.download and not args.upload:
        parser.error("give a download (-d) and/or upload (-u) rate that is not 0")


def rule_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The a{sv} keys (plain values) of the rule ``rule add`` describes: only what was given."""
    rule: dict[str, Any] = {}
    if args.rule_id is not None:
        rule["id"] = args.rule_id
    if args.label is not None:
        rule["name"] = args.label
    for key in ("exe", "comm", "cmdline", "uid", "unit"):
        if getattr(args, key) is not None:
            rule[key] = getattr(args, key)
    if args.per_app:
        rule["scope"] = names.SCOPE_APPLICATION
    if args.download is not None:
        rule["download"] = args.download
    if args.upload is not None:
        rule["upload"] = args.upload
    if args.permanent:
        rule["permanent"] = True
    if args.disabled:
        rule["enabled"] = False
    return rule


# --- rendering --------------------------------------------------------------------------------
def user_text(uid: int, lookup: Callable[[int], Any] = pwd.getpwuid) -> str:
    try:
        return f"{uid}({lookup(uid).pw_name})"
    except KeyError:
        return str(uid)


def match_text(rule: Mapping[str, Any]) -> str:
    """'exe=/usr/lib/steam/* uid=1000(alice)': the match keys of a rule, in key order."""
    parts = []
    for key in names.RULE_MATCH_KEYS:
        value = rule.get(key)
        if value is None:
            continue
        parts.append(f"{key}={user_text(int(value)) if key == 'uid' else value}")
    return " ".join(parts)


def rule_summary(rule: Mapping[str, Any]) -> str:
    """One line about a rule: what it matches, its scope, its limits."""
    scope = "one budget for all" if rule.get("scope") == names.SCOPE_APPLICATION \
        else "a budget per process"
    text = (f"{match_text(rule)}, {scope}, download {format_limit(int(rule.get('download') or 0))}"
            f", upload {format_limit(int(rule.get('upload') or 0))}")
    if rule.get("enabled") is False:
        text += ", disabled"
    return display(text)


def rules_json(rules: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for rule in sorted(rules, key=lambda r: str(r.get("id", ""))):
        row = {key: rule.get(key) for key in RULE_JSON_KEYS}
        row.update({k: v for k, v in rule.items() if k not in row})
        out.append(row)
    return out


def rules_table(rules: Iterable[Mapping[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for header, justify in (("ID", "left"), ("MATCH", "left"), ("SCOPE", "left"),
                            ("DOWNLOAD", "right"), ("UPLOAD", "right"), ("KEPT", "left"),
                            ("PROCS", "right"), ("LABEL", "left")):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    for rule in rules_json(rules):
        off = rule.get("enabled") is False
        kept = "permanent" if rule.get("permanent") else "runtime"
        table.add_row(
            cell(rule["id"]), cell(match_text(rule)),
            cell("per app" if rule.get("scope") == names.SCOPE_APPLICATION else "per process"),
            cell(format_limit(int(rule.get("download") or 0))),
            cell(format_limit(int(rule.get("upload") or 0))),
            cell(kept + (", disabled" if off else "")),
            cell("-" if rule.get("matched") is None else rule["matched"]),
            cell(rule.get("name") or ""),
            style="dim" if off else None,
        )
    return table


def rule_cell(rule_id: str | None) -> Text:
    """The RULE column of ``list`` and ``top``."""
    return cell(rule_id or "-")


# --- the rule behind each limit (for ``list``) ------------------------------------------------
async def rules_of(client: Client, pids: Iterable[int]) -> dict[int, str] | None:
    """pid -> id of the rule that limits it ('' for none), or None when the daemon does not
    report rules (an older daemon: GetStats rows without a ``rule`` key).  One ListProcesses
    call covers the processes with traffic; GetStats asks for the others, in batches."""
    wanted = list(dict.fromkeys(pids))
    if not wanted:
        return {}
    rows = await client.list_processes()
    found = {int(r["pid"]): str(r[STATS_RULE_KEY]) for r in rows if STATS_RULE_KEY in r}
    if rows and not found:
        return None
    missing = [p for p in wanted if p not in found][:MAX_STATS_CALLS]

    async def one(pid: int) -> tuple[int, bool, str | None]:
        """(pid, the daemon answered, its rule key or None)"""
        try:
            stats = await client.get_stats(pid)
        except DaemonError:  # exited meanwhile
            return pid, False, None
        value = stats.get(STATS_RULE_KEY)
        return pid, True, None if value is None else str(value)

    supported = bool(found)
    # until an answer carries the key, ask one process at a time: an older daemon (no rules)
    # costs a single GetStats
    i = 0
    while i < len(missing):
        size = STATS_BATCH if supported else 1
        for pid, answered, rule in await asyncio.gather(*(one(p)
                                                          for p in missing[i:i + size])):
            if rule is not None:
                found[pid] = rule
                supported = True
            elif answered and not supported:
                return None
        i += size
    return {p: found[p] for p in wanted if p in found} if supported else None


# --- the commands -----------------------------------------------------------------------------
async def run(client: Client, args: argparse.Namespace, out: Console) -> int:
    if args.rule_cmd == "add":
        rule = rule_from_args(args)
        rule_id = await client.add_rule(rule)
        kept = "permanent" if rule.get("permanent") else "until reboot"
        out.print(f"Added rule {display(rule_id)} ({kept}): {rule_summary(rule)}",
                  highlight=False)
    elif args.rule_cmd == "list":
        rules = await client.list_rules()
        if getattr(args, "json", False):
            from chadthrottle.cli.render import dumps

            print(dumps(rules_json(rules)))
        elif args.quiet:
            for rule in rules_json(rules):
                print(display(rule["id"]))
        elif not rules:
            out.print("No rules.")
        else:
            out.print(rules_table(rules))
    elif args.rule_cmd == "remove":
        await client.remove_rule(args.rule_id)
        out.print(f"Removed rule {display(args.rule_id)}", highlight=False)
    else:
        await client.reload()
        out.print("Reloaded the permanent rules", highlight=False)
    return 0
