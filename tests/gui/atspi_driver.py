"""Drive chadthrottle-gui through AT-SPI, as a screen reader or a person with a keyboard
would: find widgets by their accessible names, press buttons through their actions.

Runs on the distribution's /usr/bin/python3 (pyatspi).  A line protocol on stdin/stdout:
one command a line (JSON list: ``["click", "Apply"]``), one JSON answer a line
(``{"ok": true, "value": ...}`` or ``{"ok": false, "error": "..."}``).  The test in
test_applet_atspi.py speaks it; the driver exits when stdin closes.

Commands: ``wait_app``, ``wait_name`` (an accessible whose name contains a text),
``expand APP``, ``open_editor PID``, ``click NAME`` (a button, in the topmost window
first), ``entry_text NAME``, ``wait_window_gone PREFIX``, ``row_texts PID`` (the texts in
a process row), ``shot NAME`` (the applet's own screenshot action on the session bus).
"""

from __future__ import annotations

import json
import sys
import time

import gi

gi.require_version("Atspi", "2.0")
import pyatspi  # noqa: E402
from gi.repository import Atspi, Gio, GLib  # noqa: E402

APP_NAMES = ("chadthrottle-gui", "chadthrottle")
APP_ID_PATH = "/org/chadthrottle/Gui"
APP_ID = "org.chadthrottle.Gui"
TIMEOUT = 30.0


class DriverError(Exception):
    pass


def _name(obj) -> str:
    try:
        return obj.name or ""
    except GLib.Error:
        return ""


def _role(obj) -> str:
    try:
        return obj.getRoleName()
    except GLib.Error:
        return ""


def _children(obj):
    try:
        n = obj.childCount
    except GLib.Error:
        return []
    out = []
    for i in range(n):
        try:
            c = obj.getChildAtIndex(i)
        except GLib.Error:
            continue
        if c is not None:
            out.append(c)
    return out


def _walk(obj, depth: int = 0, limit: int = 40):
    yield obj
    if depth >= limit:
        return
    for c in _children(obj):
        yield from _walk(c, depth + 1, limit)


def _showing(obj) -> bool:
    """On screen now.  GTK 4.8 sets SHOWING on windows only, and VISIBLE on every widget
    whose own visible flag is set (also on a stack's hidden pages and on rows a filter hides),
    so ask for the extents: what is not on screen has none."""
    try:
        e = obj.queryComponent().getExtents(pyatspi.WINDOW_COORDS)
    except (GLib.Error, NotImplementedError):
        return False
    return e.width > 0 and e.height > 0


class Driver:
    def __init__(self) -> None:
        self.app = None

    # --- finding -----------------------------------------------------------------------------
    def find_app(self):
        desktop = pyatspi.Registry.getDesktop(0)
        for a in _children(desktop):
            if _name(a) in APP_NAMES:
                return a
        return None

    def wait(self, what: str, fn, timeout: float = TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            try:
                found = fn()
            except GLib.Error:
                found = None
            if found:
                return found
            if time.monotonic() > deadline:
                raise DriverError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.25)

    def windows(self) -> list:
        """The applet's windows, the last shown (the editor) first."""
        if self.app is None:
            raise DriverError("wait_app first")
        Atspi.Accessible.clear_cache(self.app)
        return list(reversed(_children(self.app)))

    def find(self, pred, *, root=None, showing: bool = True):
        roots = [root] if root is not None else self.windows()
        for r in roots:
            for obj in _walk(r):
                if pred(obj) and (not showing or _showing(obj)):
                    return obj
        return None

    def row_of_pid(self, pid: int):
        tag = f"(PID {pid})"
        return self.find(lambda o: _role(o) == "list item" and _name(o).endswith(tag)
                         and not _name(o).startswith("Limit of"))

    # --- acting ------------------------------------------------------------------------------
    @staticmethod
    def press(obj) -> None:
        action = obj.queryAction()
        names = [action.getName(i) for i in range(action.nActions)]
        for wanted in ("click", "activate", "press", "toggle"):
            if wanted in names:
                action.doAction(names.index(wanted))
                return
        raise DriverError(f"{_role(obj)} {_name(obj)!r} has no click action: {names}")

    # --- commands ----------------------------------------------------------------------------
    def cmd_wait_app(self, timeout: float = TIMEOUT) -> str:
        self.app = self.wait("the applet on the accessibility bus", self.find_app, timeout)
        win = self.wait("the applet's window", lambda: _children(self.app), timeout)
        return _name(win[0])

    def cmd_wait_name(self, text: str, timeout: float = TIMEOUT) -> str:
        obj = self.wait(f"an accessible named like {text!r}",
                        lambda: self.find(lambda o: text in _name(o)), timeout)
        return _name(obj)

    def cmd_expand(self, app: str, timeout: float = TIMEOUT) -> str:
        row = self.wait(f"the row of application {app}", lambda: self.find(
            lambda o: _role(o) == "list item" and _name(o).startswith(f"{app} (application")),
            timeout)
        button = self.find(lambda o: _name(o) == f"Expand {app}", root=row)
        if button is None:
            if self.find(lambda o: _name(o) == f"Collapse {app}", root=row):
                return "already expanded"
            raise DriverError(f"no expander in the row of {app}")
        self.press(button)
        return _name(row)

    def cmd_open_editor(self, pid: int, timeout: float = TIMEOUT) -> str:
        row = self.wait(f"the row of PID {pid}", lambda: self.row_of_pid(pid), timeout)
        button = self.find(lambda o: _role(o) == "push button"
                           and _name(o).startswith("Set limit of"), root=row)
        if button is None:
            raise DriverError(f"no limit button in the row {_name(row)!r}")
        self.press(button)
        win = self.wait("the limit editor", lambda: self.find(
            lambda o: _name(o).startswith("Limit ") and f"(PID {pid})" in _name(o)
            and _role(o) in ("frame", "dialog", "window")), timeout)
        return _name(win)

    def cmd_click(self, name: str, timeout: float = TIMEOUT) -> str:
        button = self.wait(f"a button named {name!r}", lambda: self.find(
            lambda o: _name(o) == name and _role(o) in ("push button", "toggle button",
                                                         "check box", "radio button",
                                                         "page tab")), timeout)
        self.press(button)
        return _role(button)

    def cmd_entry_text(self, name: str, expected: str | None = None,
                       timeout: float = 10.0) -> str:
        """The text of a field; with ``expected``, wait until it is that (a button's click
        lands after GTK's 250 ms press animation, not when the action returns)."""
        entry = self.wait(f"a text field named {name!r}", lambda: self.find(
            lambda o: _name(o) == name and "Text" in pyatspi.listInterfaces(o)), timeout)

        def read() -> str:
            t = entry.queryText()
            return t.getText(0, t.characterCount)
        if expected is None:
            return read()
        deadline = time.monotonic() + timeout
        while (value := read()) != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        return value

    def cmd_type(self, name: str, text: str, timeout: float = TIMEOUT) -> str:
        """Replace the text of a field, as typing would."""
        entry = self.wait(f"an editable field named {name!r}", lambda: self.find(
            lambda o: _name(o) == name and "EditableText" in pyatspi.listInterfaces(o)),
            timeout)
        entry.queryEditableText().setTextContents(text)
        t = entry.queryText()
        return t.getText(0, t.characterCount)

    def cmd_sensitive(self, name: str, timeout: float = TIMEOUT) -> bool:
        obj = self.wait(f"a widget named {name!r}", lambda: self.find(lambda o: _name(o) == name),
                        timeout)
        return obj.getState().contains(pyatspi.STATE_SENSITIVE)

    def cmd_wait_window_gone(self, prefix: str, timeout: float = TIMEOUT) -> bool:
        def gone() -> bool:
            return not any(_name(w).startswith(prefix) for w in self.windows())
        return self.wait(f"the window {prefix!r} to close", gone, timeout)

    def cmd_row_texts(self, pid: int, timeout: float = TIMEOUT) -> list[str]:
        row = self.wait(f"the row of PID {pid}", lambda: self.row_of_pid(pid), timeout)
        return [_name(o) for o in _walk(row) if _role(o) == "label" and _name(o)]

    def cmd_wait_row_text(self, pid: int, text: str, timeout: float = TIMEOUT) -> list[str]:
        def has() -> list[str] | None:
            texts = self.cmd_row_texts(pid, timeout)
            return texts if any(text in t for t in texts) else None
        return self.wait(f"{text!r} in the row of PID {pid}", has, timeout)

    def cmd_window_states(self, title: str) -> list[str]:
        """The states of the applet's window with this title ([] when there is none)."""
        for w in self.windows():
            if _name(w) == title:
                return sorted(pyatspi.stateToString(x) for x in w.getState().getStates())
        return []

    def cmd_wait_window_shown(self, title: str, shown: bool = True,
                              timeout: float = TIMEOUT) -> list[str]:
        def check() -> list[str] | None:
            states = self.cmd_window_states(title)
            return (states or ["none"]) if ("showing" in states) == shown else None
        return self.wait(f"the window {title!r} {'shown' if shown else 'hidden'}", check,
                         timeout)

    def cmd_dump(self) -> list[str]:
        """The applet's accessible tree, one line a node (for failure messages)."""
        out = []

        def rec(obj, depth: int) -> None:
            mark = "" if _showing(obj) else " (not shown)"
            out.append(f"{'  ' * depth}{_role(obj)} {_name(obj)!r}{mark}")
            if depth < 40:
                for c in _children(obj):
                    rec(c, depth + 1)
        for w in self.windows():
            rec(w, 0)
        return out

    def cmd_shot(self, name: str) -> str:
        bus = Gio.bus_get_sync(Gio.BusType.SESSION, None)
        bus.call_sync(APP_ID, APP_ID_PATH, "org.gtk.Actions", "Activate",
                      GLib.Variant("(sava{sv})", ("screenshot", [GLib.Variant("s", name)], {})),
                      None, Gio.DBusCallFlags.NONE, 10_000, None)
        return name


def main() -> int:
    d = Driver()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd, *args = json.loads(line)
            value = getattr(d, f"cmd_{cmd}")(*args)
            out = {"ok": True, "value": value}
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails on it
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
