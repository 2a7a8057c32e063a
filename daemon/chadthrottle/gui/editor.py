"""The limit editor: a download and an upload limit (log slider, presets, typed rates in the
CLI's units), what it applies to, and whether it is permanent.

Scopes and the calls they make (DESIGN §2, §2b):

* this process and its children — ``SetLimit(pid, down, up)`` (``ClearLimit`` to remove);
* the whole application — ``AddRule({exe, scope: "application", download, upload,
  permanent})``: every process of the executable shares one budget;
* its unit — ``SetUnitLimit(unit, down, up)``, or a permanent rule ``{unit, scope:
  "application"}``.

Editing a rule (from the Limits and Rules tab) adds the changed rule and then removes the old
one: the contract has no call that changes a rule in place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gi

gi.require_version("Gtk", "4.0")
gi.require_version("Adw", "1")
from gi.repository import Adw, Gtk  # noqa: E402

from chadthrottle.gui import access, sliders, text  # noqa: E402
from chadthrottle.gui.bus import CallError, ThrottleClient  # noqa: E402
from chadthrottle.gui.model import App, Proc, app_name  # noqa: E402
from chadthrottle.units import RateError, format_limit, format_rate, parse_rate  # noqa: E402

SCOPE_PROCESS, SCOPE_APPLICATION, SCOPE_UNIT = "process", "application", "unit"


class RateEditor(Gtk.Box):
    """One direction: heading, log slider with marks, a typed rate, preset buttons."""

    def __init__(self, direction: str, rate: int, now: float | None,
                 on_change: Callable[[], None]) -> None:
        super().__init__(orientation=Gtk.Orientation.VERTICAL, spacing=6)
        self.direction = direction  # "Download" / "Upload"
        self.on_change = on_change
        self.rate: int | None = rate
        self._updating = False

        head = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=8)
        title = Gtk.Label(label=f"{'↓' if direction == 'Download' else '↑'} {direction}",
                          xalign=0.0)
        title.add_css_class("heading")
        head.append(title)
        if now is not None:
            cur = Gtk.Label(label=f"now {format_rate(now)}", xalign=0.0)
            cur.add_css_class("dim-label")
            cur.add_css_class("caption")
            head.append(cur)
        self.append(head)

        row = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=10)
        adj = Gtk.Adjustment(lower=sliders.LOG_MIN, upper=sliders.LOG_UNLIMITED,
                             step_increment=1.0 / sliders.STEPS_PER_OCTAVE, page_increment=1.0)
        self.scale = Gtk.Scale(orientation=Gtk.Orientation.HORIZONTAL, adjustment=adj)
        self.scale.set_draw_value(False)
        self.scale.set_hexpand(True)
        for pos, label in sliders.MARKS:
            self.scale.add_mark(pos, Gtk.PositionType.BOTTOM, label)
        self.scale.update_property([Gtk.AccessibleProperty.LABEL], [f"{direction} limit"])
        self.scale.connect("value-changed", self._on_scale)
        self.entry = Gtk.Entry()
        self.entry.set_width_chars(11)
        self.entry.set_valign(Gtk.Align.START)
        self.entry.set_tooltip_text(
            "A rate as chadthrottlectl takes it: 50K = 50,000 B/s, 1MiB = 1,048,576 B/s, "
            "10mbit; 0 or 'unlimited' for no limit")
        self.entry.update_property([Gtk.AccessibleProperty.LABEL], [f"{direction} limit rate"])
        self.entry.connect("changed", self._on_entry)
        row.append(self.scale)
        row.append(self.entry)
        self.append(row)

        presets = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=6)
        presets.add_css_class("linked")
        self.preset_buttons: list[tuple[int, Gtk.ToggleButton]] = []
        group = None
        for label, value in sliders.PRESETS:
            b = Gtk.ToggleButton(label=label)
            b.set_hexpand(True)
            if group is not None:
                b.set_group(group)
            group = group or b
            b.update_property([Gtk.AccessibleProperty.LABEL], [f"{direction} {label}"])
            b.connect("clicked", self._on_preset, value)
            presets.append(b)
            self.preset_buttons.append((value, b))
        self.append(presets)

        self.error = Gtk.Label(xalign=0.0, wrap=True)
        self.error.add_css_class("error")
        self.error.add_css_class("caption")
        self.error.set_visible(False)
        self.append(self.error)
        self.set_rate(rate)

    def set_rate(self, rate: int, *, from_entry: bool = False) -> None:
        self._updating = True
        try:
            self.rate = rate
            self.scale.set_value(sliders.rate_to_position(rate))
            if not from_entry:
                self.entry.set_text(format_limit(rate))
            for value, b in self.preset_buttons:
                b.set_active(value == rate)
            self.error.set_visible(False)
            self.entry.remove_css_class("error")
        finally:
            self._updating = False
        self.on_change()

    def _on_scale(self, scale: Gtk.Scale) -> None:
        if not self._updating:
            self.set_rate(sliders.position_to_rate(scale.get_value()))

    def _on_preset(self, _b: Gtk.ToggleButton, value: int) -> None:
        if not self._updating:
            self.set_rate(value)

    def _on_entry(self, entry: Gtk.Entry) -> None:
        if self._updating:
            return
        try:
            rate = parse_rate(entry.get_text())
        except RateError as e:
            self.rate = None
            self.error.set_label(str(e))
            self.error.set_visible(True)
            entry.add_css_class("error")
            self.on_change()
            return
        self.set_rate(rate, from_entry=True)


def _boxed_row(title: str, subtitle: str, widget: Gtk.Widget, *, prefix: bool) -> Adw.ActionRow:
    row = Adw.ActionRow(title=title, subtitle=subtitle)
    row.set_title_lines(2)
    if prefix:
        row.add_prefix(widget)
    else:
        row.add_suffix(widget)
    row.set_activatable_widget(widget)
    return row


class LimitEditor(Adw.Window):
    """``target`` is a Proc (a process row, or a limit of the Limits tab), an App, or a rule
    dict (``rule=``) from ListRules."""

    def __init__(self, parent: Gtk.Window, client: ThrottleClient, *, my_uid: int,
                 proc: Proc | None = None, app: App | None = None,
                 rule: dict[str, Any] | None = None,
                 on_done: Callable[[str], None]) -> None:
        super().__init__(modal=True, transient_for=parent, destroy_with_parent=True)
        self.client = client
        self.proc = proc
        self.app = app
        self.rule = rule
        self.on_done = on_done
        self.my_uid = my_uid
        self.scope_buttons: dict[str, Gtk.CheckButton] = {}
        self.scope_access: dict[str, tuple[str, str]] = {}
        self.busy = False
        self.set_default_size(560, -1)
        self.set_resizable(False)

        if rule is not None:
            name = rule.get("name") or rule.get("id", "rule")
            title, subtitle = f"Edit rule {name}", text.rule_summary(rule)
            down, up = int(rule.get("download", 0) or 0), int(rule.get("upload", 0) or 0)
            now_d = now_u = None
        elif proc is not None:
            title = f"Limit {proc.name} (PID {proc.pid})"
            subtitle = " · ".join(x for x in (proc.exe, proc.user and f"user {proc.user}") if x)
            down, up = proc.download_limit, proc.upload_limit
            now_d, now_u = proc.download_rate, proc.upload_rate
        else:
            assert app is not None
            n = len(app.procs)
            title = f"Limit {app.name}"
            subtitle = f"{n} process{'es' if n != 1 else ''} · {app.exe or 'comm ' + app.comm}"
            common = app.common_limit or (0, 0)
            down, up = common
            now_d, now_u = app.download_rate, app.upload_rate
        self.set_title(title)

        header = Adw.HeaderBar()
        header.set_show_end_title_buttons(False)
        header.set_show_start_title_buttons(False)
        wt = Adw.WindowTitle(title=title, subtitle=subtitle)
        header.set_title_widget(wt)
        cancel = Gtk.Button(label="Cancel")
        cancel.connect("clicked", lambda _b: self.close())
        header.pack_start(cancel)
        self.apply_button = Gtk.Button()
        self.apply_button.add_css_class("suggested-action")
        inner = Gtk.Box(spacing=6)
        self.apply_lock = Gtk.Image.new_from_icon_name("changes-prevent-symbolic")
        self.apply_spinner = Gtk.Spinner(visible=False)
        inner.append(self.apply_lock)
        inner.append(self.apply_spinner)
        inner.append(Gtk.Label(label="Apply"))
        self.apply_button.set_child(inner)
        self.apply_button.update_property([Gtk.AccessibleProperty.LABEL], ["Apply"])
        self.apply_button.connect("clicked", self._apply)
        header.pack_end(self.apply_button)

        body = Gtk.Box(orientation=Gtk.Orientation.VERTICAL, spacing=18)
        for m in ("top", "bottom", "start", "end"):
            getattr(body, f"set_margin_{m}")(18)
        self.download = RateEditor("Download", down, now_d, self._refresh)
        self.upload = RateEditor("Upload", up, now_u, self._refresh)
        body.append(self.download)
        body.append(self.upload)

        if rule is None:
            body.append(self._scope_section())
        self.permanent = Gtk.Switch(valign=Gtk.Align.CENTER)
        self.permanent.set_active(bool(rule and rule.get("permanent")))
        self.permanent.connect("notify::active", lambda *_: self._refresh())
        self.permanent.update_property([Gtk.AccessibleProperty.LABEL], ["Make permanent"])
        perm_list = Gtk.ListBox(selection_mode=Gtk.SelectionMode.NONE)
        perm_list.add_css_class("boxed-list")
        self.permanent_row = _boxed_row(
            "Make permanent",
            "Keep it as a rule that survives restarts and reboots (a file in rules.d)",
            self.permanent, prefix=False)
        perm_list.append(self.permanent_row)
        body.append(perm_list)

        self.message = Gtk.Label(xalign=0.0, wrap=True)
        self.message.add_css_class("error")
        self.message.set_visible(False)
        body.append(self.message)

        if proc is not None and proc.limited and rule is None:
            remove = Gtk.Button(label="Remove the limit of this process")
            remove.add_css_class("destructive-action")
            remove.set_halign(Gtk.Align.START)
            a, why = access.process_access(client.permissions, proc, my_uid)
            remove.set_sensitive(a != access.NO)
            remove.set_tooltip_text(why or None)
            remove.connect("clicked", self._remove)
            body.append(remove)

        outer = Gtk.Box(orientation=Gtk.Orientation.VERTICAL)
        outer.append(header)
        outer.append(body)
        self.set_content(outer)
        esc = Gtk.ShortcutController()
        esc.add_shortcut(Gtk.Shortcut.new(Gtk.ShortcutTrigger.parse_string("Escape"),
                                          Gtk.CallbackAction.new(lambda *_: self.close())))
        self.add_controller(esc)
        self._refresh()

    # --- scope -------------------------------------------------------------------------------
    def _scope_section(self) -> Gtk.Widget:
        box = Gtk.Box(orientation=Gtk.Orientation.VERTICAL, spacing=6)
        heading = Gtk.Label(label="Applies to", xalign=0.0)
        heading.add_css_class("heading")
        box.append(heading)
        lst = Gtk.ListBox(selection_mode=Gtk.SelectionMode.NONE)
        lst.add_css_class("boxed-list")
        perms = self.client.permissions
        single = self._single_proc()
        app_exe, app_comm, app_label = self._app_identity()
        unit = self._unit_target()

        choices: list[tuple[str, str, str, tuple[str, str]]] = []
        if single is not None:
            choices.append((SCOPE_PROCESS, "This process and its children",
                            f"PID {single.pid} (SetLimit)",
                            access.process_access(perms, single, self.my_uid)))
        else:
            choices.append((SCOPE_PROCESS, "One process",
                            "Open a process row to limit it alone", (access.NO, "")))
        choices.append((SCOPE_APPLICATION, f"The whole application: {app_label}",
                        f"Every process of {app_exe or 'comm ' + app_comm} shares one budget "
                        f"(a rule)", access.rules_access(perms, self.client.rules_supported)))
        if unit:
            choices.append((SCOPE_UNIT, f"Its unit: {unit}", "Every process in it (SetUnitLimit)",
                            access.unit_access(perms)))
        else:
            choices.append((SCOPE_UNIT, "Its unit",
                            "The process is not in a unit of its own (it is in the root cgroup)",
                            (access.NO, "")))
        group = None
        for scope, title, subtitle, (answer, why) in choices:
            check = Gtk.CheckButton()
            if group is not None:
                check.set_group(group)
            group = group or check
            row = _boxed_row(title, subtitle, check, prefix=True)
            if answer == access.AUTH:
                row.add_suffix(Gtk.Image.new_from_icon_name("changes-prevent-symbolic"))
            disabled = answer == access.NO
            row.set_sensitive(not disabled)
            row.set_tooltip_text(why or (subtitle if disabled else None))
            check.update_property([Gtk.AccessibleProperty.LABEL], [title])
            check.connect("toggled", lambda *_: self._refresh())
            self.scope_buttons[scope] = check
            self.scope_access[scope] = (answer, why)
            lst.append(row)
        # default: this process for a process row, the application for an application row
        preferred = [SCOPE_PROCESS, SCOPE_APPLICATION, SCOPE_UNIT] if self.proc is not None \
            else [SCOPE_APPLICATION, SCOPE_PROCESS, SCOPE_UNIT]
        for scope in preferred:
            if self.scope_access[scope][0] != access.NO:
                self.scope_buttons[scope].set_active(True)
                break
        box.append(lst)
        return box

    def _single_proc(self) -> Proc | None:
        if self.proc is not None:
            return self.proc
        if self.app is not None and len(self.app.procs) == 1:
            return next(iter(self.app.procs.values()))
        return None

    def _app_identity(self) -> tuple[str, str, str]:
        if self.app is not None:
            return self.app.exe, self.app.comm, self.app.name
        assert self.proc is not None
        return self.proc.exe, self.proc.comm, app_name(self.proc.exe, self.proc.comm)

    def _unit_target(self) -> str:
        if self.proc is not None:
            return self.proc.unit_target
        if self.app is not None:
            units = {p.unit_target for p in self.app.procs.values()}
            if len(units) == 1:
                return units.pop()
        return ""

    def scope(self) -> str:
        if self.rule is not None:
            return "rule"
        for scope, b in self.scope_buttons.items():
            if b.get_active():
                return scope
        return ""

    # --- state -------------------------------------------------------------------------------
    def _refresh(self) -> None:
        if not hasattr(self, "apply_button") or not hasattr(self, "permanent"):
            return  # still being built
        scope = self.scope()
        if scope == "rule":
            answer, why = access.rules_access(self.client.permissions, True)
        else:
            answer, why = self.scope_access.get(scope, (access.NO, "Choose what it applies to"))
        can_permanent = scope in (SCOPE_APPLICATION, SCOPE_UNIT, "rule")
        if scope == SCOPE_UNIT:
            rules_answer, rules_why = access.rules_access(self.client.permissions,
                                                          self.client.rules_supported)
            can_permanent = rules_answer != access.NO
            if self.permanent.get_active():
                answer, why = rules_answer, rules_why
        self.permanent_row.set_sensitive(can_permanent)
        self.permanent_row.set_tooltip_text(
            None if can_permanent else
            "A process ends with its limit; make the application's or the unit's limit "
            "permanent instead" if scope == SCOPE_PROCESS else
            "Rules are not available here")
        valid = self.download.rate is not None and self.upload.rate is not None
        self.apply_lock.set_visible(answer == access.AUTH)
        self.apply_button.set_sensitive(valid and answer != access.NO and not self.busy)
        self.apply_button.set_tooltip_text(why or None)

    def _show_error(self, err: CallError | str) -> None:
        self.busy = False
        self.apply_spinner.stop()
        self.apply_spinner.set_visible(False)
        msg = err if isinstance(err, str) else text.explain(err.name, err.text)
        self.message.set_label(msg)
        self.message.set_visible(True)
        self._refresh()

    def _finish(self, message: str) -> Callable[[Any, CallError | None], None]:
        def done(_r: Any, err: CallError | None) -> None:
            if err is not None:
                self._show_error(err)
                return
            self.on_done(message)
            self.close()
        return done

    # --- actions -----------------------------------------------------------------------------
    def _apply(self, _b: Gtk.Button) -> None:
        d, u = self.download.rate, self.upload.rate
        if d is None or u is None or self.busy:
            return
        scope = self.scope()
        permanent = self.permanent.get_active() and self.permanent_row.get_sensitive()
        self.busy = True
        self.apply_spinner.set_visible(True)
        self.apply_spinner.start()
        self.message.set_visible(False)
        self._refresh()
        c = self.client
        if scope == SCOPE_PROCESS:
            p = self._single_proc()
            assert p is not None
            target = text.who(p.pid, p.name)
            if not d and not u:
                if not p.limited:
                    self.close()
                    return
                c.clear_limit(p.pid, self._finish(f"Cleared the limit of {target}"))
            else:
                c.set_limit(p.pid, d, u, self._finish(text.limited_message(target, d, u)))
        elif scope == SCOPE_APPLICATION:
            if not d and not u:
                self._show_error("A rule needs a download or an upload limit; remove rules in "
                                 "the Limits and Rules tab")
                return
            exe, comm, label = self._app_identity()
            rule: dict[str, Any] = {"name": label, "scope": "application",
                                    "download": d, "upload": u, "permanent": permanent}
            if exe:
                rule["exe"] = exe
            else:
                rule["comm"] = comm
            c.add_rule(rule, self._finish(
                f"Limited application {label}: {text.limits_summary(d, u)}"
                + (" (permanent)" if permanent else "")))
        elif scope == SCOPE_UNIT:
            unit = self._unit_target()
            if permanent:
                if not d and not u:
                    self._show_error("A rule needs a download or an upload limit")
                    return
                c.add_rule({"name": unit, "unit": unit, "scope": "application",
                            "download": d, "upload": u, "permanent": True},
                           self._finish(f"Limited unit {unit}: {text.limits_summary(d, u)} "
                                        f"(permanent)"))
            elif not d and not u:
                c.clear_unit_limit(unit, self._finish(f"Cleared the limit of unit {unit}"))
            else:
                c.set_unit_limit(unit, d, u, self._finish(
                    f"Limited unit {unit}: {text.limits_summary(d, u)}"))
        elif scope == "rule":
            self._replace_rule(d, u, permanent)
        else:
            self._show_error("Choose what the limit applies to")

    def _replace_rule(self, d: int, u: int, permanent: bool) -> None:
        assert self.rule is not None
        if not d and not u:
            self._show_error("A rule needs a download or an upload limit; remove it instead")
            return
        old_id = str(self.rule.get("id", ""))
        new = {k: v for k, v in self.rule.items()
               if k in ("name", "exe", "comm", "cmdline", "uid", "unit", "scope", "enabled")}
        new.update(download=d, upload=u, permanent=permanent)
        name = new.get("name") or old_id

        def added(_r: Any, err: CallError | None) -> None:
            if err is not None:
                self._show_error(err)
                return
            self.client.remove_rule(old_id, self._finish(
                f"Changed rule {name}: {text.limits_summary(d, u)}"))

        self.client.add_rule(new, added)

    def _remove(self, _b: Gtk.Button) -> None:
        p = self.proc
        assert p is not None
        self.busy = True
        self._refresh()
        self.client.clear_limit(p.pid, self._finish(
            f"Cleared the limit of {text.who(p.pid, p.name)}"))
