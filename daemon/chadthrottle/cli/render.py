"""Pure presentation: JSON shapes and human text/tables for chadthrottlectl.

The JSON keys are part of the CLI's interface (documented in the README and ``--help``):

* ``stats --json``: one object with the contract's GetStats keys (:data:`STATS_KEYS`);
  rates and limits in bytes/s, byte counts in bytes, drops in packets.
* ``top --json``: a list of such objects, highest ``download_rate + upload_rate`` first.
* ``list --json``: a list of ``{"pid", "comm", "download_limit", "upload_limit"}`` by pid,
  plus ``"rule"`` (the id of the rule behind the limit, "" for none) when the daemon
  reports rules.
* ``info --json``: ``{"version", "attached_cgroups", "client_version"}``.

Every string in human output that comes from elsewhere (process and unit names, cgroup
paths, the daemon's words) passes :func:`chadthrottle.safetext.printable`, so control
characters are shown escaped (``\\x1b``) and never reach the terminal (issue 7, item 8);
JSON output escapes them as ``\\uXXXX``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from rich.table import Table
from rich.text import Text

from chadthrottle import names
from chadthrottle.cli.rules import rule_cell
from chadthrottle.safetext import json_safe, printable
from chadthrottle.units import format_bytes, format_limit, format_rate

STATS_KEYS: tuple[str, ...] = (
    "pid", "comm", "cgroup",
    "download_limit", "upload_limit",
    "download_rate", "upload_rate",
    "download_bytes", "upload_bytes",
    "download_dropped", "upload_dropped",
    "program_calls", "status",
)
_INT_KEYS = frozenset(STATS_KEYS) - {"comm", "cgroup", "status", "download_rate", "upload_rate"}
_FLOAT_KEYS = frozenset({"download_rate", "upload_rate"})

LIST_KEYS: tuple[str, ...] = ("pid", "comm", "download_limit", "upload_limit")
#: GetStats/ListProcesses key (and ``list --json`` key) naming the rule behind a limit
RULE_KEY = "rule"
INFO_KEYS: tuple[str, ...] = ("version", "attached_cgroups", "client_version")

STATUS_TEXT = {
    names.STATUS_THROTTLED: "limited; holding the limit",
    names.STATUS_NOT_WORKING: "NOT WORKING: rate is above 1.5x the limit",
    names.STATUS_PROGRAM_NOT_CALLED: "eBPF program NOT BEING CALLED while traffic flows",
    names.STATUS_NOT_DROPPING: "over the limit but NOT DROPPING packets",
    names.STATUS_UNLIMITED: "no limit set",
}
STATUS_STYLE = {
    names.STATUS_THROTTLED: "green",
    names.STATUS_NOT_WORKING: "bold red",
    names.STATUS_PROGRAM_NOT_CALLED: "bold red",
    names.STATUS_NOT_DROPPING: "bold red",
    names.STATUS_UNLIMITED: "dim",
}
LIMITED_ROW_STYLE = "bold yellow"


def stats_json(stats: Mapping[str, Any]) -> dict[str, Any]:
    """GetStats a{sv} (already unwrapped) -> the stable JSON object.

    Every contract key is present (missing ones become null), in contract order, with JSON
    types: integers for limits/bytes/drops/calls, floats for rates.  Keys the daemon adds
    later are passed through after them.
    """
    out: dict[str, Any] = {}
    for key in STATS_KEYS:
        value = stats.get(key)
        if value is not None:
            if key in _INT_KEYS:
                value = int(value)
            elif key in _FLOAT_KEYS:
                value = float(value)
            else:
                value = str(value)
        out[key] = value
    for key, value in stats.items():
        if key not in out:
            out[key] = value
    return out


def is_limited(stats: Mapping[str, Any]) -> bool:
    return bool(stats.get("download_limit") or stats.get("upload_limit"))


def total_rate(stats: Mapping[str, Any]) -> float:
    return float(stats.get("download_rate") or 0.0) + float(stats.get("upload_rate") or 0.0)


def sort_processes(procs: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Highest total rate first; ties by pid (stable across refreshes)."""
    return sorted(procs, key=lambda p: (-total_rate(p), int(p.get("pid") or 0)))


def top_json(procs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [stats_json(p) for p in sort_processes(procs)]


def list_json(limits: Iterable[tuple[int, int, int]], comms: Mapping[int, str | None],
              rules: Mapping[int, str] | None = None) -> list[dict[str, Any]]:
    """``rules`` (pid -> rule id, '' for none) is None when the daemon does not report rules:
    then the rows have no ``rule`` key."""
    rows = [
        {"pid": pid, "comm": comms.get(pid), "download_limit": down, "upload_limit": up}
        for pid, down, up in sorted(limits)
    ]
    if rules is not None:
        for row in rows:
            row[RULE_KEY] = rules.get(row["pid"], "")
    return rows


def info_json(version: str | None, attached: Iterable[str] | None,
              client_version: str) -> dict[str, Any]:
    return {
        "version": version,
        "attached_cgroups": list(attached) if attached is not None else None,
        "client_version": client_version,
    }


def dumps(obj: Any) -> str:
    return json_safe(json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False))


# --- human text ----------------------------------------------------------------------------
def who(pid: int, comm: str | None) -> str:
    """``PID 9256 (wget)``, the name escaped."""
    return f"PID {pid} ({printable(comm)})" if comm else f"PID {pid}"


def _drops(n: Any) -> str:
    n = int(n or 0)
    return f"{n} packet{'s' if n != 1 else ''} dropped"


def stats_text(stats: Mapping[str, Any]) -> str:
    """The `stats PID` block."""
    s = stats_json(stats)
    status = s["status"] or "?"
    lines = [
        f"PID {s['pid']} ({printable(s['comm'] or '?')})",
        f"  cgroup:    {printable(s['cgroup'] or '?')}",
        f"  status:    {printable(status)} ({STATUS_TEXT.get(status, 'unknown status')})",
    ]
    for direction in ("download", "upload"):
        rate = format_rate(s[f"{direction}_rate"] or 0.0)
        limit = format_limit(s[f"{direction}_limit"] or 0)
        total = format_bytes(s[f"{direction}_bytes"] or 0)
        lines.append(
            f"  {direction + ':':<10} {rate:>11}   limit {limit:<12} total {total:>9}   "
            f"{_drops(s[f'{direction}_dropped'])}"
        )
    lines.append(f"  eBPF program calls: {s['program_calls'] or 0}")
    return "\n".join(lines)


def limits_summary(download: int, upload: int) -> str:
    if not download and not upload:
        return "no limit"
    return f"download {format_limit(download)}, upload {format_limit(upload)}"


def list_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("PID", justify="right")
    table.add_column("NAME")
    table.add_column("DOWNLOAD LIMIT", justify="right")
    table.add_column("UPLOAD LIMIT", justify="right")
    with_rule = any(row.get(RULE_KEY) for row in rows)
    if with_rule:
        table.add_column("RULE")
    for row in rows:
        cells = [str(row["pid"]), printable(row["comm"] or "?"),
                 format_limit(row["download_limit"]), format_limit(row["upload_limit"])]
        table.add_row(*cells, *([rule_cell(row.get(RULE_KEY))] if with_rule else []))
    return table


def _limit_cell(limit: Any) -> str:
    return format_limit(int(limit)) if limit else "-"


def top_table(procs: Iterable[Mapping[str, Any]], caption: str | None = None) -> Table:
    """The `top` table: highest first, limited rows highlighted, status coloured."""
    table = Table(box=None, pad_edge=False, header_style="bold reverse", caption=caption,
                  caption_justify="left", expand=False)
    table.add_column("PID", justify="right")
    table.add_column("NAME", max_width=16, no_wrap=True)
    table.add_column("DOWN", justify="right")
    table.add_column("UP", justify="right")
    table.add_column("DOWN LIMIT", justify="right")
    table.add_column("UP LIMIT", justify="right")
    table.add_column("STATUS")
    table.add_column("DROPS ↓/↑", justify="right")
    procs = sort_processes(procs)
    with_rule = any(RULE_KEY in p for p in procs)  # a daemon that reports rules
    if with_rule:
        table.add_column("RULE", max_width=24, no_wrap=True)
    for p in procs:
        s = stats_json(p)
        status = s["status"] or "?"
        table.add_row(
            str(s["pid"]),
            printable(s["comm"] or "?"),
            format_rate(s["download_rate"] or 0.0),
            format_rate(s["upload_rate"] or 0.0),
            _limit_cell(s["download_limit"]),
            _limit_cell(s["upload_limit"]),
            Text(printable(status), style=STATUS_STYLE.get(status, "")),
            f"{s['download_dropped'] or 0}/{s['upload_dropped'] or 0}",
            *([rule_cell(p.get(RULE_KEY))] if with_rule else []),
            style=LIMITED_ROW_STYLE if is_limited(s) else None,
        )
    return table
