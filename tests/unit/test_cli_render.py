"""JSON shapes and human rendering of chadthrottlectl (pure)."""

from __future__ import annotations

import io
import json

from dbus_fast import Variant
from rich.console import Console

from chadthrottle import names
from chadthrottle.cli import client, render
from chadthrottle.cli.top import caption

SAMPLE = {
    "pid": 12345, "comm": "wget", "cgroup": "/user.slice/tmux.scope",
    "download_limit": 51200, "upload_limit": 0,
    "download_rate": 48_200.0, "upload_rate": 1_100.0,
    "download_bytes": 1_234_567, "upload_bytes": 12_000,
    "download_dropped": 12, "upload_dropped": 0,
    "program_calls": 4321, "status": "throttled",
}


def proc(pid: int, down: float, up: float = 0.0, limit: int = 0, comm: str = "p") -> dict:
    return {**SAMPLE, "pid": pid, "comm": comm, "download_rate": down, "upload_rate": up,
            "download_limit": limit, "status": "throttled" if limit else "unlimited"}


def test_stats_json_has_every_contract_key_in_order_with_json_types() -> None:
    out = render.stats_json(SAMPLE)
    assert tuple(out) == render.STATS_KEYS
    assert render.STATS_KEYS == (
        "pid", "comm", "cgroup", "download_limit", "upload_limit", "download_rate",
        "upload_rate", "download_bytes", "upload_bytes", "download_dropped",
        "upload_dropped", "program_calls", "status")
    assert isinstance(out["download_rate"], float) and isinstance(out["pid"], int)
    assert json.loads(render.dumps(out)) == out


def test_stats_json_fills_missing_keys_and_passes_new_ones_through() -> None:
    out = render.stats_json({"pid": 7, "status": "unlimited", "burst_bytes": 10})
    assert out["comm"] is None and out["download_rate"] is None
    assert out["burst_bytes"] == 10
    assert list(out)[-1] == "burst_bytes"


def test_variants_are_unwrapped() -> None:
    raw = {"pid": Variant("u", 5), "download_rate": Variant("d", 1.5),
           "nested": Variant("as", ["a", "b"])}
    assert client._plain(raw) == {"pid": 5, "download_rate": 1.5, "nested": ["a", "b"]}


def test_top_json_is_highest_total_rate_first_then_pid() -> None:
    procs = [proc(3, 10.0), proc(1, 100.0), proc(2, 50.0, 60.0), proc(4, 10.0)]
    assert [p["pid"] for p in render.top_json(procs)] == [2, 1, 3, 4]


def test_list_json_shape() -> None:
    rows = render.list_json([(20, 0, 2048), (10, 51200, 0)], {10: "wget", 20: None})
    assert rows == [
        {"pid": 10, "comm": "wget", "download_limit": 51200, "upload_limit": 0},
        {"pid": 20, "comm": None, "download_limit": 0, "upload_limit": 2048},
    ]
    assert all(tuple(r) == render.LIST_KEYS for r in rows)


def test_info_json_shape() -> None:
    out = render.info_json("0.1.0", ["/sys/fs/cgroup/unified"], "0.1.0")
    assert tuple(out) == render.INFO_KEYS


def test_stats_text_shows_rates_limits_and_verdict() -> None:
    text = render.stats_text(SAMPLE)
    assert text.startswith("PID 12345 (wget)")
    assert "48.2 KB/s" in text and "50 KiB/s" in text and "unlimited" in text
    assert "12 packets dropped" in text and "0 packets dropped" in text
    assert "throttled" in text and "4321" in text and "1.2 MB" in text


def test_every_status_has_an_explanation_and_a_style() -> None:
    for status in (names.STATUS_THROTTLED, names.STATUS_NOT_WORKING,
                   names.STATUS_PROGRAM_NOT_CALLED, names.STATUS_NOT_DROPPING,
                   names.STATUS_UNLIMITED):
        assert status in render.STATUS_TEXT and status in render.STATUS_STYLE


def _render(table) -> str:
    buf = io.StringIO()
    Console(file=buf, width=140, force_terminal=False, color_system=None).print(table)
    return buf.getvalue()


def test_top_table_orders_rows_and_highlights_limited_ones() -> None:
    procs = [proc(3, 10.0, comm="slow"), proc(1, 2e6, limit=1_048_576, comm="curl"),
             proc(2, 5e5, comm="wget")]
    table = render.top_table(procs, caption="cap")
    text = _render(table)
    assert text.index("curl") < text.index("wget") < text.index("slow")
    assert "2.0 MB/s" in text and "1 MiB/s" in text and "cap" in text
    for header in ("PID", "NAME", "DOWN", "UP", "DOWN LIMIT", "UP LIMIT", "STATUS", "DROPS"):
        assert header in text
    assert table.rows[0].style == render.LIMITED_ROW_STYLE
    assert table.rows[1].style is None


def test_top_table_empty_and_caption() -> None:
    assert "PID" in _render(render.top_table([]))
    assert caption("0.1.0", 1, 1.0, True) == \
        "chadthrottled 0.1.0 · 1 process with traffic · every 1 s · q to quit"
    assert caption(None, 3, 2.0, False) == "chadthrottled · 3 processes with traffic"


def test_list_table_and_summary() -> None:
    text = _render(render.list_table(render.list_json([(10, 51200, 0)], {10: "wget"})))
    assert "wget" in text and "50 KiB/s" in text and "unlimited" in text
    assert render.limits_summary(0, 0) == "no limit"
    assert render.limits_summary(50_000, 0) == "download 50 KB/s, upload unlimited"


def test_error_explanations_are_plain() -> None:
    x = client.explain
    assert "systemctl start chadthrottled" in x(client.DBUS_SERVICE_UNKNOWN, "The name is not"
                                                " activatable")
    assert "make run" in x(client.DBUS_NAME_HAS_NO_OWNER, "")
    assert "not running" in x("org.freedesktop.DBus.Error.Spawn.ChildExited", "")
    msg = x(names.ERR_NOT_AUTHORIZED, "uid 1000 may not limit pid 1", pid=1)
    assert names.POLKIT_ACTION_LIMIT_OWN in msg and names.POLKIT_ACTION_LIMIT_ANY in msg
    assert names.POLKIT_ACTION_LIMIT_ANY in x(client.DBUS_ACCESS_DENIED, "")
    assert x(names.ERR_NO_SUCH_PROCESS, "", pid=42).startswith("no such process: process 42")
    assert x(names.ERR_NO_SUCH_PROCESS, "pid 2 is a kernel thread") == \
        "no such process: pid 2 is a kernel thread"
    assert "has no limit" in x(names.ERR_NO_SUCH_LIMIT, "", pid=42)
    assert "'foo.scope'" in x(names.ERR_NO_SUCH_UNIT, "", unit="foo.scope")
    assert x(names.ERR_NO_SUCH_UNIT, "no unit 'x'", unit="x") == \
        "no such unit or cgroup: no unit 'x'"
    assert "journalctl" in x(names.ERR_FAILED, "boom")
    assert "cgroup setup" in x(names.ERR_UNSUPPORTED, "no BTF")
    assert x("com.example.Other", "raw text") == "raw text"
    assert x("com.example.Other", "") == "com.example.Other"


def test_daemon_error_carries_name_and_message() -> None:
    e = client.DaemonError(names.ERR_NO_SUCH_PROCESS, "no such process", "detail")
    assert (e.name, str(e), e.detail) == (names.ERR_NO_SUCH_PROCESS, "no such process", "detail")


def test_names_are_data_not_markup() -> None:
    from chadthrottle.cli.main import make_console

    console = make_console()
    with console.capture() as cap:
        console.print(render.top_table([proc(1, 5.0, comm="[bold]x:smile:")]))
        console.print("unit [red]a.scope")
    text = cap.get()
    assert "[bold]x:smile:" in text and "unit [red]a.scope" in text
