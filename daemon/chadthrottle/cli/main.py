"""chadthrottlectl: the command line client of the chadthrottled daemon.

A D-Bus client of org.chadthrottle.Throttle1 on the system bus and nothing else: it never
imports the engine or the service (DESIGN.md §4).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from rich.console import Console

from chadthrottle import __version__, names
from chadthrottle.cli import completion, render
from chadthrottle.cli import rules as rulecli
from chadthrottle.cli.client import Client, DaemonError
from chadthrottle.cli.procs import comm_of, find_by_name
from chadthrottle.cli.run import ExecFailed, run_limited
from chadthrottle.safetext import printable
from chadthrottle.units import RULES, RateError, parse_rate

PROG = "chadthrottlectl"
EXIT_OK = 0
EXIT_DAEMON = 1
EXIT_USAGE = 2
PID_MAX = 2**32 - 1

EPILOG = f"""\
{RULES}

exit codes: 0 ok; 1 the daemon (or the bus) refused or failed — the D-Bus error name is
printed in [brackets]; 2 usage error (bad option, bad rate, ambiguous --name). 'run' exits
with the command's own status (128+N if a signal N killed it; 127 not found, 126 not
executable).

--json (on stats, list, top, info, rule list) prints stable keys:
  stats/top: pid comm cgroup download_limit upload_limit download_rate upload_rate
             download_bytes upload_bytes download_dropped upload_dropped program_calls
             status  (rates and limits in bytes/s, bytes in bytes, drops in packets;
             top prints a list, highest rate first)
  list:      pid comm download_limit upload_limit (and rule, the id of the rule behind
             the limit, "" for none, when the daemon reports rules)
  info:      version attached_cgroups client_version
  rule list: id name exe comm cmdline uid unit scope download upload permanent enabled
             matched  (a key the rule does not have is null)

The daemon is reached on the system bus ($DBUS_SYSTEM_BUS_ADDRESS if set); start it with
'sudo systemctl start chadthrottled' (or 'sudo make run' from a source checkout).
Shell completion: source <({PROG} completion bash)."""


class CliError(Exception):
    """A failure with a plain message and a chosen exit code (not from the daemon)."""

    def __init__(self, message: str, code: int = EXIT_DAEMON) -> None:
        super().__init__(message)
        self.code = code


# --- argument types --------------------------------------------------------------------------
def pid_arg(text: str) -> int:
    try:
        pid = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id") from None
    if not 1 <= pid <= PID_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id (1 … {PID_MAX})")
    return pid


def rate_arg(text: str) -> int:
    try:
        return parse_rate(text)
    except RateError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def interval_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError("the interval must be between 0.1 and 3600 seconds")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


# --- the parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Limit the network bandwidth of processes and systemd units "
                    "(a client of the chadthrottled daemon).",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("--json", action="store_true", default=False,
                   help="machine-readable output for read commands (stats, list, top, info, "
                        "rule list)")
    p.add_argument("--bus", metavar="ADDRESS",
                   help="D-Bus address of the system bus (default: $DBUS_SYSTEM_BUS_ADDRESS, "
                        "else the standard socket)")

    json_parent = argparse.ArgumentParser(add_help=False)
    json_parent.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                             help="print JSON (keys: see '%(prog)s --help' of the main command)")

    target_parent = argparse.ArgumentParser(add_help=False)
    target = target_parent.add_mutually_exclusive_group(required=True)
    target.add_argument("pid", nargs="?", type=pid_arg, metavar="PID", help="process id")
    target.add_argument("--name", metavar="NAME",
                        help="the process called NAME (its comm or argv[0] basename); an error "
                             "if none or several match")

    def rate_options(parser: argparse.ArgumentParser, what: str) -> None:
        parser.add_argument("-d", "--download", type=rate_arg, metavar="RATE",
                            help=f"download (receive) limit{what}, e.g. 50K, 1.5M, 512KiB/s, "
                                 f"10mbit; 0 or 'unlimited' = none")
        parser.add_argument("-u", "--upload", type=rate_arg, metavar="RATE",
                            help=f"upload (send) limit{what}; same units")

    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    sp = sub.add_parser("limit", parents=[target_parent], formatter_class=fmt, epilog=RULES,
                        help="limit a process and its children (one shared budget)",
                        description="Limit a process and all its descendants, present and "
                                    "future, as one budget. A direction you do not give keeps "
                                    "its current limit (use 0 to remove it).")
    rate_options(sp, "")

    sub.add_parser("clear", parents=[target_parent], help="remove a process's limit",
                   description="Remove the limit of a process.")

    sub.add_parser("stats", parents=[target_parent, json_parent],
                   help="rates, limits, drops and status of one process",
                   description="Show rates, limits, byte and drop counters and the daemon's "
                               "verdict for any process, limited or not.")

    sub.add_parser("list", parents=[json_parent], help="every limited process",
                   description="List every limited process with its limits.")

    sp = sub.add_parser("top", parents=[json_parent],
                        help="live table of processes with traffic (q quits)",
                        description="A live table of every process that moved bytes recently, "
                                    "highest rate first; limited ones are highlighted. Press q "
                                    "to quit. When stdout is not a terminal (or with --json) "
                                    "it prints one snapshot and exits.")
    sp.add_argument("-i", "--interval", type=interval_arg, default=1.0, metavar="SECONDS",
                    help="refresh interval (default 1)")
    sp.add_argument("-n", "--iterations", type=positive_int, metavar="N",
                    help="stop after N refreshes")

    sp = sub.add_parser("unit", help="limit a systemd unit or cgroup as a whole",
                        description="Limit every process of a systemd unit (firefox.scope, "
                                    "foo.service) or of a cgroup path relative to the cgroup2 "
                                    "mount, as one budget.")
    usub = sp.add_subparsers(dest="unit_cmd", metavar="COMMAND", required=True)
    up = usub.add_parser("limit", formatter_class=fmt, epilog=RULES,
                         help="limit a unit or cgroup",
                         description="Limit a unit or cgroup. A direction you do not give is "
                                     "unlimited.")
    up.add_argument("unit", metavar="UNIT", help="unit name or cgroup path")
    rate_options(up, "")
    up = usub.add_parser("clear", help="remove a unit's limit")
    up.add_argument("unit", metavar="UNIT", help="unit name or cgroup path")

    sp = sub.add_parser("run", formatter_class=fmt, epilog=RULES,
                        help="run a command limited from its first byte",
                        usage=f"{PROG} run [-d RATE] [-u RATE] -- COMMAND [ARG ...]",
                        description="Start COMMAND already limited (no unlimited burst at "
                                    "start); its children share the budget. Exits with the "
                                    "command's exit status; the limit is removed at the end.")
    rate_options(sp, "")
    sp.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                    help="the command and its arguments, after --")

    sub.add_parser("info", parents=[json_parent], help="daemon version and attached cgroups",
                   description="Show the daemon's version and the cgroups its programs are "
                               "attached to.")

    rsub = rulecli.add_parser(sub, json_parent=json_parent, rate_options=rate_options,
                              epilog=RULES)

    sp = sub.add_parser("completion", help="print a shell completion script",
                        description="Print a completion script: "
                                    f"'source <({PROG} completion bash)', or for zsh "
                                    f"'eval \"$({PROG} completion zsh)\"' after compinit.")
    sp.add_argument("shell", choices=("bash", "zsh"), help="the shell")
    for subparsers in (sub, usub, rsub):  # check_args() reports errors with the right usage
        for parser in subparsers.choices.values():
            parser.set_defaults(parser=parser)
    return p


# --- commands ----------------------------------------------------------------------------------
def resolve_target(args: argparse.Namespace) -> tuple[int, str | None]:
    """(pid, comm) from PID or --name."""
    if args.pid is not None:
        return args.pid, comm_of(args.pid)
    found = find_by_name(args.name, exclude={os.getpid(), os.getppid()})
    if not found:
        raise CliError(f"no such process: nothing is called {args.name!r}", EXIT_DAEMON)
    if len(found) > 1:
        listing = ", ".join(f"{p.pid} ({p.cmdline[:40]})" for p in found[:10])
        more = f" and {len(found) - 10} more" if len(found) > 10 else ""
        raise CliError(f"{len(found)} processes are called {args.name!r}: {listing}{more}; "
                       f"give the PID instead", EXIT_USAGE)
    return found[0].pid, found[0].comm


who = render.who


async def cmd_limit(c: Client, args: argparse.Namespace, out: Console) -> int:
    pid, comm = resolve_target(args)
    down, up = args.download, args.upload
    if down is None or up is None:  # keep the direction not given
        current = {p: (d, u) for p, d, u in await c.list_limits()}
        cur_down, cur_up = current.get(pid, (0, 0))
        down = cur_down if down is None else down
        up = cur_up if up is None else up
    await c.set_limit(pid, down, up)
    if down or up:
        out.print(f"Limited {who(pid, comm)}: {render.limits_summary(down, up)}", highlight=False)
    else:
        out.print(f"Removed the limit of {who(pid, comm)}", highlight=False)
    return EXIT_OK


async def cmd_clear(c: Client, args: argparse.Namespace, out: Console) -> int:
    pid, comm = resolve_target(args)
    await c.clear_limit(pid)
    out.print(f"Cleared the limit of {who(pid, comm)}", highlight=False)
    return EXIT_OK


async def cmd_stats(c: Client, args: argparse.Namespace, out: Console) -> int:
    pid, _ = resolve_target(args)
    stats = await c.get_stats(pid)
    if args.json:
        print(render.dumps(render.stats_json(stats)))
    else:
        print(render.stats_text(stats))
    return EXIT_OK


async def cmd_list(c: Client, args: argparse.Namespace, out: Console) -> int:
    limits = await c.list_limits()
    rules = await rulecli.rules_of(c, [pid for pid, _, _ in limits])
    rows = render.list_json(limits, {pid: comm_of(pid) for pid, _, _ in limits}, rules)
    if args.json:
        print(render.dumps(rows))
    elif not rows:
        out.print("No process is limited.")
    else:
        out.print(render.list_table(rows))
    return EXIT_OK


async def cmd_top(c: Client, args: argparse.Namespace, out: Console) -> int:
    from chadthrottle.cli import top

    if args.json:
        print(render.dumps(render.top_json(await top.snapshot(c))))
    elif not sys.stdout.isatty():
        procs = await top.snapshot(c)
        version = await c.get_property("Version")
        out.print(render.top_table(procs, top.caption(version, len(procs), args.interval,
                                                      False)))
    else:
        await top.live(c, args.interval, args.iterations, out)
    return EXIT_OK


async def cmd_unit(c: Client, args: argparse.Namespace, out: Console) -> int:
    if args.unit_cmd == "limit":
        down, up = args.download or 0, args.upload or 0
        await c.set_unit_limit(args.unit, down, up)
        out.print(f"Limited unit {printable(args.unit)}: {render.limits_summary(down, up)}",
                  highlight=False)
    else:
        await c.clear_unit_limit(args.unit)
        out.print(f"Cleared the limit of unit {printable(args.unit)}", highlight=False)
    return EXIT_OK


async def cmd_run(c: Client, args: argparse.Namespace, out: Console) -> int:
    return await run_limited(c, args.command, args.download or 0, args.upload or 0)


async def cmd_info(c: Client, args: argparse.Namespace, out: Console) -> int:
    version = await c.get_property("Version")
    attached = await c.get_property("AttachedCgroups")
    data = render.info_json(version, attached, __version__)
    if args.json:
        print(render.dumps(data))
    else:
        out.print(f"chadthrottled {printable(version)} on {names.BUS_NAME} "
                  f"(client {__version__})", highlight=False)
        out.print("attached to: " + (", ".join(printable(a) for a in attached)
                                     if attached else "(nothing yet)"), highlight=False)
    return EXIT_OK


async def cmd_rule(c: Client, args: argparse.Namespace, out: Console) -> int:
    return await rulecli.run(c, args, out)


COMMANDS = {
    "limit": cmd_limit, "clear": cmd_clear, "stats": cmd_stats, "list": cmd_list,
    "top": cmd_top, "unit": cmd_unit, "run": cmd_run, "info": cmd_info, "rule": cmd_rule,
}


def check_args(args: argparse.Namespace) -> None:
    """Cross-option rules argparse cannot express; parser.error() exits 2."""
    parser: argparse.ArgumentParser = args.parser
    if args.cmd == "run":
        command = list(args.command)
        if command and command[0] == "--":
            command = command[1:]
        if not command:
            parser.error("give the command to run after --, e.g. "
                         f"'{PROG} run -d 1M -- curl -O URL'")
        args.command = command
    if args.cmd in ("limit", "run") or (args.cmd == "unit" and args.unit_cmd == "limit"):
        if args.download is None and args.upload is None:
            hint = " (use 'clear' to remove a limit)" if args.cmd != "run" else ""
            parser.error(f"give a download (-d) and/or upload (-u) rate{hint}")
    if args.cmd == "run" and not (args.download or args.upload):
        parser.error("a limit of 0 in both directions would not limit anything")
    if args.cmd == "rule":
        rulecli.check(args, parser)


def make_console() -> Console:
    """Process names, unit names and paths are data: no rich markup, emoji or highlighting
    is applied to them ('[x]' in a comm stays '[x]')."""
    return Console(highlight=False, markup=False, emoji=False,
                   width=None if sys.stdout.isatty() else 160)


def error(message: str, name: str | None = None) -> None:
    suffix = f" [{printable(name)}]" if name else ""
    print(f"{PROG}: {printable(message)}{suffix}", file=sys.stderr)


async def _dispatch(args: argparse.Namespace) -> int:
    out = make_console()
    async with Client(args.bus) as client:
        return await COMMANDS[args.cmd](client, args, out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args)
    if args.cmd == "completion":
        print(completion.script(args.shell, parser), end="")
        return EXIT_OK
    try:
        return asyncio.run(_dispatch(args))
    except DaemonError as e:
        error(e.message, e.name)
        return EXIT_DAEMON
    except CliError as e:
        error(str(e))
        return e.code
    except KeyboardInterrupt:
        return 130
    except ExecFailed as e:
        error(str(e))
        return e.exit_code
    except BrokenPipeError:  # `chadthrottlectl top --json | head`: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout
        return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
