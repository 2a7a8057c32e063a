"""Printing benchmark results: one JSON object per line, or a table."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table


def emit_json(row: dict) -> None:
    print(json.dumps(row, sort_keys=False), flush=True)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right" if c not in ("direction", "client", "case") else "left")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    Console(file=sys.stdout, width=140).print(t)


def human_rate(bps: float) -> str:
    for unit, div in (("MiB/s", 1 << 20), ("KiB/s", 1 << 10)):
        if bps >= div:
            return f"{bps / div:.2f} {unit}"
    return f"{bps:.0f} B/s"
