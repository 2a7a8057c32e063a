"""Issue 7, item 8: the one escaping helper, and the daemon's log formatter built on it."""

from __future__ import annotations

import json
import logging

from chadthrottle.cli import render
from chadthrottle.safetext import printable, printable_lines
from chadthrottle.server.log import JournalHandler, SafeFormatter

EVIL = "\x1b]2;pwn\x07\x1b[2J"


def test_issue7_terminal_escapes_every_control_character_is_escaped():
    every = "".join(chr(c) for c in [*range(0x20), 0x7f, *range(0x80, 0xa0)])
    out = printable(every)
    assert all(0x20 <= ord(c) < 0x7f for c in out), out
    assert out.startswith("\\x00\\x01") and "\\x1b" in out and "\\x7f" in out
    assert out.endswith("\\x9f")
    assert printable(EVIL) == "\\x1b]2;pwn\\x07\\x1b[2J"
    assert printable("a\u202eb\u2066c\u2028") == "a\\u202eb\\u2066c\\u2028"


def test_issue7_terminal_escapes_leave_ordinary_text_alone():
    for text in ("wget", "Web Content", "é.service", "日本語", "🦊 firefox", "a\\x1b"):
        assert printable(text) == text
    assert printable(printable(EVIL)) == printable(EVIL)  # idempotent
    assert printable(None) == "None"
    assert printable_lines("a\x1b\nb") == "a\\x1b\nb"


def test_issue7_terminal_escapes_json_keeps_the_data():
    data = {"comm": EVIL + "\x9b\u202e", "x": "é"}
    out = render.dumps(data)
    assert not any(c in out for c in "\x1b\x07\x9b\u202e")
    assert json.loads(out) == data
    assert "é" in out  # not ASCII-escaped


def test_issue7_terminal_escapes_renderers():
    stats = {"pid": 7, "comm": EVIL, "cgroup": "/a\x1b[31m", "status": "throttled",
             "download_limit": 0, "upload_limit": 0, "download_rate": 0.0,
             "upload_rate": 0.0, "download_bytes": 0, "upload_bytes": 0,
             "download_dropped": 0, "upload_dropped": 0, "program_calls": 0}
    text = render.stats_text(stats)
    assert "\x1b" not in text and "PID 7 (\\x1b]2;pwn\\x07\\x1b[2J)" in text
    assert "/a\\x1b[31m" in text
    assert render.who(7, EVIL) == "PID 7 (\\x1b]2;pwn\\x07\\x1b[2J)"
    from rich.console import Console

    console = Console(file=open("/dev/null", "w"), record=True, width=200, markup=False,  # noqa: SIM115
                      color_system=None)
    console.print(render.list_table([{"pid": 7, "comm": EVIL, "download_limit": 0,
                                      "upload_limit": 0}]))
    console.print(render.top_table([stats]))
    shown = console.export_text()
    assert "\x1b" not in shown and "\\x1b]2;pwn" in shown


def test_issue7_terminal_escapes_log_formatter_message_and_traceback():
    fmt = SafeFormatter("%(levelname)s %(message)s")
    rec = logging.LogRecord("chadthrottle.engine", logging.INFO, __file__, 1,
                            "PID %d (%s): limit", (7, EVIL), None)
    assert fmt.format(rec) == "INFO PID 7 (\\x1b]2;pwn\\x07\\x1b[2J): limit"
    try:
        raise ValueError(EVIL)
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    out = fmt.format(rec)
    assert "\x1b" not in out and "\nValueError: \\x1b]2;pwn" in out  # lines kept


def test_issue7_terminal_escapes_journal_handler_message_escaped_fields_raw():
    sent = []
    h = JournalHandler(send=lambda msg, **f: sent.append((msg, f)))
    rec = logging.LogRecord("chadthrottle.diagnostics", logging.INFO, __file__, 1,
                            "PID 7 (%s) download", (EVIL,), None)
    rec.journal = {"CHADTHROTTLE_COMM": EVIL}
    h.emit(rec)
    msg, fields = sent[0]
    assert msg == "PID 7 (\\x1b]2;pwn\\x07\\x1b[2J) download"
    assert fields["CHADTHROTTLE_COMM"] == EVIL
