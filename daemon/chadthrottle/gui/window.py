"""The main window: total rates in the header, the processes list (applications, expandable
to their processes), the Limits and Rules tab, and a clear page while the daemon is not
running, which goes away by itself when the daemon comes back."""

from __future__ import annotations

import os
from typing import Any

import gi

gi.require_version("Gtk", "4.0")
gi.require_version("Adw", "1")
from gi.repository import Adw, Gdk, Gio, GLib, Gtk  # noqa: E402

from chadthrottle.gui import access, text  # noqa: E402
from chadthrottle.gui.bus import CallError, ThrottleClient  # noqa: E402
from chadthrottle.gui.editor import LimitEditor  # noqa: E402
from chadthrottle.gui.limits_page import LimitsPage  # noqa: E402
from chadthrottle.gui.model import App, Changes, Model, Proc, visible  # noqa: E402
from chadthrottle.gui.prefs import Prefs  # noqa: E402
from chadthrottle.gui.rows import AppRow, BaseRow, ProcRow, header_row  # noqa: E402
from chadthrottle.units import format_rate  # noqa: E402

CSS = b"""
.ct-header { padding: 6px 12px 6px 12px; }
.ct-list row { padding-left: 12px; padding-right: 12px; }
.ct-totals { font-feature-settings: "tnum"; }
.ct-down { color: #3584e4; }
.ct-up { color: #e66100; }
"""


class MainWindow(Adw.ApplicationWindow):
    def __init__(self, app: Adw.Application, client: ThrottleClient, prefs: Prefs) -> None:
        super().__init__(application=app, title="chadthrottle")
        self.client = client
        self.prefs = prefs
        self.model = Model()
        self.my_uid = os.getuid()
        self.app_rows: dict[str, AppRow] = {}
        self.proc_rows: dict[int, ProcRow] = {}
        self.expanded: set[str] = set()
        self.order: dict[str, int] = {}
        self.editor: LimitEditor | None = None
        self.set_default_size(1180, 640)

        provider = Gtk.CssProvider()
        provider.load_from_data(CSS)
        Gtk.StyleContext.add_provider_for_display(Gdk.Display.get_default(), provider,
                                                  Gtk.STYLE_PROVIDER_PRIORITY_APPLICATION)

        # --- header ---
        self.view = Adw.ViewStack()
        header = Adw.HeaderBar()
        switcher = Adw.ViewSwitcherTitle(stack=self.view, title="chadthrottle")
        header.set_title_widget(switcher)
        totals = Gtk.Box(spacing=12)
        totals.add_css_class("ct-totals")
        self.total_down = Gtk.Label(label="↓ —")
        self.total_down.add_css_class("ct-down")
        self.total_down.add_css_class("heading")
        self.total_up = Gtk.Label(label="↑ —")
        self.total_up.add_css_class("ct-up")
        self.total_up.add_css_class("heading")
        totals.append(self.total_down)
        totals.append(self.total_up)
        self.totals = totals
        header.pack_start(totals)
        menu = Gio.Menu()
        menu.append("Notifications", "app.notifications")
        menu.append("About chadthrottle", "app.about")
        menu.append("Quit", "app.quit")
        menu_button = Gtk.MenuButton(icon_name="open-menu-symbolic", menu_model=menu)
        menu_button.set_tooltip_text("Menu")
        header.pack_end(menu_button)
        self.live_label = Gtk.Label()
        self.live_label.add_css_class("dim-label")
        self.live_label.add_css_class("caption")
        header.pack_end(self.live_label)

        # --- processes page ---
        procs = Gtk.Box(orientation=Gtk.Orientation.VERTICAL)
        bar = Gtk.Box(spacing=8)
        for m in ("top", "bottom"):
            getattr(bar, f"set_margin_{m}")(8)
        bar.set_margin_start(12)
        bar.set_margin_end(12)
        self.search = Gtk.SearchEntry(placeholder_text="Search applications, PIDs, users")
        self.search.set_hexpand(True)
        self.search.update_property([Gtk.AccessibleProperty.LABEL], ["Search"])
        self.search.connect("search-changed", lambda _e: self._refilter())
        self.search.set_key_capture_widget(procs)  # typing in the list searches
        self.active_only = Gtk.ToggleButton(label="Active only")
        self.active_only.set_tooltip_text("Hide applications and processes with no traffic now")
        self.active_only.set_active(bool(prefs["active_only"]))
        self.active_only.connect("toggled", self._on_active_only)
        bar.append(self.search)
        bar.append(self.active_only)
        procs.append(bar)
        procs.append(header_row())
        procs.append(Gtk.Separator())
        self.listbox = Gtk.ListBox(selection_mode=Gtk.SelectionMode.NONE)
        self.listbox.add_css_class("ct-list")
        self.listbox.set_show_separators(True)
        self.listbox.update_property([Gtk.AccessibleProperty.LABEL], ["Applications"])
        self.listbox.set_sort_func(self._sort)
        self.listbox.set_filter_func(self._filter)
        self.listbox.connect("row-activated", lambda _l, row: self._open_editor(row))
        self.placeholder = Adw.StatusPage(icon_name="network-transmit-receive-symbolic",
                                          title="No network traffic yet",
                                          description="Processes appear here as they move bytes")
        self.listbox.set_placeholder(self.placeholder)
        scroller = Gtk.ScrolledWindow(vexpand=True)
        scroller.set_child(self.listbox)
        procs.append(scroller)
        page = self.view.add_titled(procs, "processes", "Processes")
        page.set_icon_name("network-transmit-receive-symbolic")

        # --- limits and rules page ---
        self.limits_page = LimitsPage(client, self.model, self.my_uid,
                                      edit_process=lambda p: self._edit(proc=p),
                                      edit_rule=lambda r: self._edit(rule=r), toast=self.toast)
        page = self.view.add_titled(self.limits_page, "limits", "Limits and Rules")
        page.set_icon_name("view-list-symbolic")

        # --- daemon not running ---
        self.down_page = Adw.StatusPage(icon_name="network-offline-symbolic")
        down_box = Gtk.Box(orientation=Gtk.Orientation.VERTICAL, spacing=12,
                           halign=Gtk.Align.CENTER)
        cmd = Gtk.Label(label=text.START_HINT, selectable=True)
        cmd.add_css_class("monospace")
        cmd.add_css_class("title-4")
        down_box.append(cmd)
        buttons = Gtk.Box(spacing=12, halign=Gtk.Align.CENTER)
        copy = Gtk.Button(label="Copy the command")
        copy.add_css_class("pill")
        copy.connect("clicked", self._copy_command)
        self.start_button = Gtk.Button(label="Start it")
        self.start_button.add_css_class("pill")
        self.start_button.add_css_class("suggested-action")
        self.start_button.set_tooltip_text("Ask the system bus to start chadthrottled "
                                           "(bus activation, where it is installed)")
        self.start_button.connect("clicked", self._start_daemon)
        buttons.append(copy)
        buttons.append(self.start_button)
        down_box.append(buttons)
        self.down_page.set_child(down_box)

        self.outer = Gtk.Stack()
        self.outer.add_named(self.view, "up")
        self.outer.add_named(self.down_page, "down")
        self.toasts = Adw.ToastOverlay()
        self.toasts.set_child(self.outer)
        box = Gtk.Box(orientation=Gtk.Orientation.VERTICAL)
        box.append(header)
        box.append(self.toasts)
        self.set_content(box)

        self.connect("close-request", self._on_close)
        client.on("state", self._on_state)
        client.on("stats", self._on_stats)
        client.on("live-mode", self._on_live_mode)
        client.on("limit-changed", self._on_limit_changed)
        client.on("limit-removed", self._on_limit_removed)
        client.on("limits", self._on_limits)
        client.on("rules", self._on_rules)
        client.on("permissions", self._on_permissions)
        self._on_state(client.state, client.detail)

    def _on_close(self, _w: Gtk.Window) -> bool:
        app = self.get_application()
        if app is not None and app.hides_to_tray():
            self.set_visible(False)
            return True  # kept: the tray icon shows it again
        return False

    # --- daemon state ------------------------------------------------------------------------
    def _on_state(self, state: str, detail: str) -> None:
        if state == "up":
            self.outer.set_visible_child_name("up")
            self.totals.set_visible(True)
            return
        self.totals.set_visible(False)
        self.live_label.set_label("")
        if state == "connecting":
            self.down_page.set_title("Connecting to the system bus…")
            self.down_page.set_description("")
        elif state == "no-bus":
            self.down_page.set_title("The system bus cannot be reached")
            self.down_page.set_description(
                f"{detail}\nSo the chadthrottle daemon cannot be running. Start it with the "
                f"command below (from a source checkout: {text.DEV_START_HINT}). This window "
                f"connects by itself once it can.")
        else:
            self.down_page.set_title("The chadthrottle daemon is not running")
            self.down_page.set_description(
                "Start it with the command below (from a source checkout: "
                f"{text.DEV_START_HINT}). This window follows it by itself when it comes back.")
        self.start_button.set_visible(state == "down")
        self.outer.set_visible_child_name("down")
        self._forget_all()

    def _on_live_mode(self, mode: str) -> None:
        if mode == "subscribed":
            label, tip = "live", "Statistics arrive as Stats signals (Subscribe)"
        elif mode == "polling":
            label = "polling every second"
            tip = "This daemon has no Subscribe: the applet asks ListProcesses once a second"
        else:
            label, tip = "no live data", f"Subscribe failed ({mode}); trying again"
        self.live_label.set_label(label)
        self.live_label.set_tooltip_text(tip)

    def _copy_command(self, _b: Gtk.Button) -> None:
        self.get_clipboard().set(text.START_HINT)
        self.toast("Copied: " + text.START_HINT)

    def _start_daemon(self, _b: Gtk.Button) -> None:
        def done(_r: Any, err: CallError | None) -> None:
            if err is not None:
                self.toast(f"Could not start it ({err.text or err.name}); "
                           f"run: {text.START_HINT}")
        self.client.start_daemon(done)

    # --- data --------------------------------------------------------------------------------
    def _forget_all(self) -> None:
        for row in list(self.proc_rows.values()) + list(self.app_rows.values()):
            self.listbox.remove(row)
        self.proc_rows.clear()
        self.app_rows.clear()
        self.model = Model()
        self.limits_page.model = self.model
        self.limits_page.set_limits([])

    def _on_stats(self, rows: list[dict[str, Any]]) -> None:
        ch = self.model.update(rows)
        self._apply_changes(ch)
        self.total_down.set_label(f"↓ {format_rate(self.model.total_download)}")
        self.total_up.set_label(f"↑ {format_rate(self.model.total_upload)}")
        self.total_down.update_property(
            [Gtk.AccessibleProperty.LABEL],
            [f"Total download now {format_rate(self.model.total_download)}"])
        self.total_up.update_property(
            [Gtk.AccessibleProperty.LABEL],
            [f"Total upload now {format_rate(self.model.total_upload)}"])
        for row in self.app_rows.values():
            row.update()
            self._set_row_access(row)  # an application's options change with its processes
        for row in self.proc_rows.values():
            row.update()
        self._resort()

    def _apply_changes(self, ch: Changes) -> None:
        for proc in ch.removed_procs:
            row = self.proc_rows.pop(proc.pid, None)
            if row is not None:
                self.listbox.remove(row)
        for app in ch.removed_apps:
            row = self.app_rows.pop(app.key, None)
            if row is not None:
                self.listbox.remove(row)
        for app in ch.added_apps:
            row = AppRow(app, self._open_editor, self._toggle)
            row.set_expanded(app.key in self.expanded)
            self.app_rows[app.key] = row
            self.listbox.append(row)
            self._set_row_access(row)
        for proc in ch.added_procs:
            if proc.pid in self.model.procs:
                row = ProcRow(proc, self._open_editor)
                self.proc_rows[proc.pid] = row
                self.listbox.append(row)
                self._set_row_access(row)
        for proc, _old in ch.moved_procs:
            app = self.model.app_of(proc)
            if app is not None and app.key in self.app_rows:
                self.app_rows[app.key].update()

    def _resort(self) -> None:
        self.order = {a.key: i for i, a in enumerate(self.model.sorted_apps())}
        self.listbox.invalidate_sort()
        self.listbox.invalidate_filter()

    def _refilter(self) -> None:
        self.listbox.invalidate_filter()
        q = self.search.get_text().strip()
        self.placeholder.set_title("Nothing matches" if q else "No network traffic yet")

    def _on_active_only(self, b: Gtk.ToggleButton) -> None:
        self.prefs.set("active_only", b.get_active())
        self._refilter()

    def _key(self, row: Gtk.ListBoxRow) -> tuple:
        if isinstance(row, AppRow):
            return (self.order.get(row.app.key, 1 << 30), row.app.key, 0, 0.0, 0)
        if isinstance(row, ProcRow):
            p = row.proc
            return (self.order.get(p.key, 1 << 30), p.key, 1, -p.rate, p.pid)
        return (1 << 31, "", 0, 0.0, 0)

    def _sort(self, a: Gtk.ListBoxRow, b: Gtk.ListBoxRow) -> int:
        ka, kb = self._key(a), self._key(b)
        return (ka > kb) - (ka < kb)

    def _filter(self, row: Gtk.ListBoxRow) -> bool:
        q = self.search.get_text()
        active = self.active_only.get_active()
        if isinstance(row, AppRow):
            return visible(row.app, None, query=q, active_only=active, expanded=False)
        if isinstance(row, ProcRow):
            app = self.model.app_of(row.proc)
            if app is None:
                return False
            return visible(app, row.proc, query=q, active_only=active,
                           expanded=app.key in self.expanded or bool(q.strip()))
        return True

    def _toggle(self, row: AppRow) -> None:
        if row.app.key in self.expanded:
            self.expanded.discard(row.app.key)
        else:
            self.expanded.add(row.app.key)
        row.set_expanded(row.app.key in self.expanded)
        self.listbox.invalidate_filter()

    # --- limits ------------------------------------------------------------------------------
    def _on_limit_changed(self, pid: int, down: int, up: int) -> None:
        if self.model.set_limit(pid, down, up) is not None and pid in self.proc_rows:
            self.proc_rows[pid].update()
            self._update_app_of(pid)

    def _on_limit_removed(self, pid: int, reason: str) -> None:
        if reason == "exited":
            ch = self.model.remove_process(pid)
            self._apply_changes(ch)
        elif self.model.set_limit(pid, 0, 0) is not None and pid in self.proc_rows:
            self.proc_rows[pid].update()
            self._update_app_of(pid)

    def _update_app_of(self, pid: int) -> None:
        proc = self.model.procs.get(pid)
        app = self.model.app_of(proc) if proc else None
        if app is not None and app.key in self.app_rows:
            self.app_rows[app.key].update()

    def _on_limits(self, limits: list[tuple[int, int, int]]) -> None:
        current = {int(p): (int(d), int(u)) for p, d, u in limits}
        for pid, proc in self.model.procs.items():
            want = current.get(pid, (0, 0) if not proc.rule else
                               (proc.download_limit, proc.upload_limit))
            if (proc.download_limit, proc.upload_limit) != want:
                self._on_limit_changed(pid, *want)
        self.limits_page.set_limits(limits)

    # --- permissions -------------------------------------------------------------------------
    def _on_rules(self, rules: list[dict] | None) -> None:
        self.limits_page.set_rules(rules)
        self._on_permissions(self.client.permissions)  # rules may have become (un)available

    def _on_permissions(self, _perms: dict[str, str] | None) -> None:
        for row in list(self.app_rows.values()) + list(self.proc_rows.values()):
            self._set_row_access(row)
        self.limits_page.rebuild()

    def _set_row_access(self, row: BaseRow) -> None:
        perms = self.client.permissions
        rules = access.rules_access(perms, self.client.rules_supported)
        if isinstance(row, ProcRow):
            options = [access.process_access(perms, row.proc, self.my_uid), rules]
        else:
            assert isinstance(row, AppRow)
            options = [rules]
            if len(row.app.procs) == 1:
                p = next(iter(row.app.procs.values()))
                options.append(access.process_access(perms, p, self.my_uid))
        answer = access.best(a for a, _ in options)
        why = next((w for a, w in options if a == answer and w), "")
        if answer == access.NO:
            why = " ".join(w for _, w in options if w)
        row.set_access(answer, why)

    # --- editor ------------------------------------------------------------------------------
    def _open_editor(self, row: Gtk.ListBoxRow) -> None:
        if isinstance(row, ProcRow):
            self._edit(proc=row.proc)
        elif isinstance(row, AppRow):
            self._edit(app=row.app)

    def _edit(self, *, proc: Proc | None = None, app: App | None = None,
              rule: dict | None = None) -> None:
        if self.editor is not None:
            self.editor.close()
        self.editor = LimitEditor(self, self.client, my_uid=self.my_uid, proc=proc, app=app,
                                  rule=rule, on_done=self.toast)
        self.editor.connect("close-request", self._editor_closed)
        self.editor.present()

    def _editor_closed(self, editor: LimitEditor) -> bool:
        if self.editor is editor:
            self.editor = None
        return False

    def toast(self, message: str) -> None:
        t = Adw.Toast(title=GLib.markup_escape_text(message))
        t.set_timeout(4)
        self.toasts.add_toast(t)
