"""The Adw.Application: one window, the bus client, preferences, notifications."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import gi

gi.require_version("Gtk", "4.0")
gi.require_version("Adw", "1")
from gi.repository import Adw, Gdk, Gio, GLib, Gtk  # noqa: E402

from chadthrottle import __version__  # noqa: E402
from chadthrottle.gui import APP_ID, PROGRAM_NAME, text  # noqa: E402
from chadthrottle.gui.bus import ThrottleClient  # noqa: E402
from chadthrottle.gui.prefs import Prefs  # noqa: E402
from chadthrottle.gui.tray import TrayItem  # noqa: E402
from chadthrottle.units import format_rate  # noqa: E402

#: a directory: the app action ``screenshot(name)`` then writes NAME.png of the topmost
#: window there (used by the tests that make the README's pictures)
SCREENSHOT_DIR_ENV = "CHADTHROTTLE_GUI_SCREENSHOT_DIR"
#: the icon in a source checkout (``make install`` puts it in the hicolor theme)
SOURCE_ICONS = Path(__file__).resolve().parents[3] / "packaging"


class Applet(Adw.Application):
    def __init__(self) -> None:
        super().__init__(application_id=APP_ID, flags=Gio.ApplicationFlags.DEFAULT_FLAGS)
        self.client = ThrottleClient()
        self.prefs = Prefs()
        self.window = None
        self.tray: TrayItem | None = None
        self._names: dict[int, str] = {}

    def do_startup(self) -> None:
        Adw.Application.do_startup(self)
        display = Gdk.Display.get_default()
        if display is not None and (SOURCE_ICONS / f"{APP_ID}.svg").exists():
            Gtk.IconTheme.get_for_display(display).add_search_path(str(SOURCE_ICONS))
        Gtk.Window.set_default_icon_name(APP_ID)
        notif = Gio.SimpleAction.new_stateful(
            "notifications", None, GLib.Variant("b", bool(self.prefs["notifications"])))
        notif.connect("change-state", self._on_notifications)
        self.add_action(notif)
        about = Gio.SimpleAction.new("about", None)
        about.connect("activate", self._about)
        self.add_action(about)
        quit_ = Gio.SimpleAction.new("quit", None)
        quit_.connect("activate", lambda *_: self.quit())
        self.add_action(quit_)
        self.set_accels_for_action("app.quit", ["<Control>q"])
        if os.environ.get(SCREENSHOT_DIR_ENV):
            shot = Gio.SimpleAction.new("screenshot", GLib.VariantType.new("s"))
            shot.connect("activate", self._screenshot)
            self.add_action(shot)
        self.client.on("limit-removed", self._notify_removed)
        self.client.on("limit-changed", self._notify_changed)
        self.client.start()
        conn = self.get_dbus_connection()
        if conn is not None:
            icons = str(SOURCE_ICONS) if (SOURCE_ICONS / f"{APP_ID}.svg").exists() else ""
            self.tray = TrayItem(conn, icon=APP_ID, icon_path=icons,
                                 on_activate=self._toggle_window)
            self.tray.start()
            self.client.on("state", lambda state, _d: self.tray.set_status(
                "Active" if state == "up" else "Passive"))

    def do_activate(self) -> None:
        from chadthrottle.gui.window import MainWindow

        if self.window is None:
            self.window = MainWindow(self, self.client, self.prefs)
            self.client.on("stats", self._update_tray)  # after the window's own handler
        self.window.present()

    def do_shutdown(self) -> None:
        if self.tray is not None:
            self.tray.stop()
        self.client.stop()
        Adw.Application.do_shutdown(self)

    # --- the tray ----------------------------------------------------------------------------
    def _toggle_window(self) -> None:
        if self.window is not None and self.window.is_visible() and self.window.is_active():
            self.window.set_visible(False)
        else:
            self.activate()

    def _update_tray(self, _rows: Any) -> None:
        if self.tray is not None and self.window is not None:
            m = self.window.model
            self.tray.set_tooltip(f"↓ {format_rate(m.total_download)}  "
                                  f"↑ {format_rate(m.total_upload)}")

    def hides_to_tray(self) -> bool:
        """Closing the window hides it while a panel shows the tray icon."""
        return self.tray is not None and self.tray.registered

    # --- preferences and notifications -------------------------------------------------------
    def _on_notifications(self, action: Gio.SimpleAction, value: GLib.Variant) -> None:
        action.set_state(value)
        self.prefs.set("notifications", value.get_boolean())

    def _notify(self, key: str, title: str, body: str) -> None:
        if not self.prefs["notifications"]:
            return
        n = Gio.Notification.new(title)
        n.set_body(body)
        self.send_notification(key, n)

    def _name(self, pid: int) -> str:
        """``PID 9256 (wget)``: the name from the list, else from /proc (kept for the exit,
        when /proc no longer has it)."""
        proc = self.window.model.procs.get(pid) if self.window is not None else None
        name = proc.name if proc is not None else self._names.get(pid, "")
        if not name:
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                name = ""
        if name:
            self._names[pid] = name
        return text.who(pid, name)

    def _notify_removed(self, pid: int, reason: str) -> None:
        name = self._name(pid)
        self._names.pop(pid, None)
        if reason == "exited":
            self._notify(f"exit-{pid}", "A limited process ended",
                         f"{name} ended; its limit is gone")
        elif not self.client.changed_by_us(pid):
            self._notify(f"limit-{pid}", "A limit was removed",
                         f"Someone else cleared the limit of {name}")

    def _notify_changed(self, pid: int, down: int, up: int) -> None:
        name = self._name(pid)  # remembered for its exit
        if not self.client.changed_by_us(pid):
            self._notify(f"limit-{pid}", "A limit was changed",
                         f"Someone else limited {name}: {text.limits_summary(down, up)}")

    # --- about, screenshots ------------------------------------------------------------------
    def _about(self, *_: Any) -> None:
        about = Adw.AboutWindow(
            transient_for=self.window, application_name="chadthrottle",
            application_icon=APP_ID, version=__version__,
            comments="Per-process network bandwidth limits with eBPF, driven over D-Bus",
            license_type=Gtk.License.GPL_2_0)
        about.present()

    def _screenshot(self, _action: Gio.SimpleAction, name: GLib.Variant) -> None:
        from chadthrottle.gui.snapshot import save_png

        stem = Path(name.get_string()).name  # a file name, never a path
        window = self.window.editor if self.window and self.window.editor else self.window
        if window is None:
            return
        path = Path(os.environ[SCREENSHOT_DIR_ENV]) / f"{stem}.png"
        try:
            save_png(window, str(path))
        except RuntimeError as e:
            print(f"{PROGRAM_NAME}: screenshot failed: {e}", file=sys.stderr)


def run(argv: list[str]) -> int:
    GLib.set_prgname(PROGRAM_NAME)
    GLib.set_application_name("chadthrottle")
    app = Applet()
    return app.run([PROGRAM_NAME, *argv])
