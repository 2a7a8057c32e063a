"""The "Limits and Rules" tab: every limited process (the ``Limits`` property, or ListLimits
on today's daemon) and every rule (ListRules, refreshed on ``RulesChanged``), each with
edit and remove buttons."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gi

gi.require_version("Gtk", "4.0")
gi.require_version("Adw", "1")
from gi.repository import Adw, Gtk  # noqa: E402

from chadthrottle.gui import access, text  # noqa: E402
from chadthrottle.gui.bus import CallError, ThrottleClient  # noqa: E402
from chadthrottle.gui.model import Model, Proc  # noqa: E402
from chadthrottle.units import format_limit  # noqa: E402


def _icon_button(icon: str, label: str, answer: str, why: str,
                 on_click: Callable[[], None]) -> Gtk.Button:
    b = Gtk.Button(icon_name=icon, valign=Gtk.Align.CENTER)
    b.add_css_class("flat")
    b.update_property([Gtk.AccessibleProperty.LABEL], [label])
    b.set_sensitive(answer != access.NO)
    b.set_tooltip_text(why or label)
    b.connect("clicked", lambda _b: on_click())
    return b


class LimitsPage(Adw.PreferencesPage):
    def __init__(self, client: ThrottleClient, model: Model, my_uid: int, *,
                 edit_process: Callable[[Proc], None], edit_rule: Callable[[dict], None],
                 toast: Callable[[str], None]) -> None:
        super().__init__()
        self.client = client
        self.model = model
        self.my_uid = my_uid
        self.edit_process = edit_process
        self.edit_rule = edit_rule
        self.toast = toast
        self.limits: list[tuple[int, int, int]] = []
        self.rules: list[dict[str, Any]] | None = []
        self._names: dict[int, str] = {}
        self._rows: dict[str, list[Gtk.Widget]] = {"limits": [], "rules": []}

        self.limits_group = Adw.PreferencesGroup(
            title="Limited processes",
            description="Limits set on one process and its children (SetLimit), here or with "
                        "chadthrottlectl limit. A limit ends when its process ends.")
        self.rules_group = Adw.PreferencesGroup(
            title="Rules",
            description="Limits for every process that matches, now and later (AddRule). "
                        "Permanent rules live in /etc/chadthrottle/rules.d.")
        refresh = Gtk.Button(icon_name="view-refresh-symbolic", valign=Gtk.Align.CENTER)
        refresh.add_css_class("flat")
        refresh.set_tooltip_text("Read the rules again")
        refresh.update_property([Gtk.AccessibleProperty.LABEL], ["Refresh rules"])
        refresh.connect("clicked", lambda _b: client.refresh_rules())
        self.rules_group.set_header_suffix(refresh)
        self.add(self.limits_group)
        self.add(self.rules_group)
        self.rebuild()

    # --- data --------------------------------------------------------------------------------
    def set_limits(self, limits: list[tuple[int, int, int]]) -> None:
        self.limits = sorted((int(p), int(d), int(u)) for p, d, u in limits)
        self._rebuild_limits()

    def set_rules(self, rules: list[dict[str, Any]] | None) -> None:
        self.rules = rules
        self._rebuild_rules()

    def rebuild(self) -> None:
        self._rebuild_limits()
        self._rebuild_rules()

    def _clear(self, which: str, group: Adw.PreferencesGroup) -> None:
        for row in self._rows[which]:
            group.remove(row)
        self._rows[which] = []

    def _add(self, which: str, group: Adw.PreferencesGroup, row: Gtk.Widget) -> None:
        group.add(row)
        self._rows[which].append(row)

    def _name(self, pid: int) -> str:
        proc = self.model.procs.get(pid)
        if proc is not None and proc.name:
            return proc.name
        if pid not in self._names:
            self._names[pid] = ""

            def got(row: Any, err: CallError | None) -> None:
                if err is None and row.get("comm"):
                    self._names[pid] = str(row["comm"])
                    self._rebuild_limits()
            self.client.get_stats(pid, got)
        return self._names[pid]

    # --- limits ------------------------------------------------------------------------------
    def _rebuild_limits(self) -> None:
        self._clear("limits", self.limits_group)
        if not self.limits:
            row = Adw.ActionRow(title="No process is limited")
            row.add_css_class("dim-label")
            self._add("limits", self.limits_group, row)
            return
        for pid, d, u in self.limits:
            name = self._name(pid)
            who = f"{name} (PID {pid})" if name else f"PID {pid}"
            row = Adw.ActionRow(title=who,
                                subtitle=f"download {format_limit(d)} · upload {format_limit(u)}")
            row.update_property([Gtk.AccessibleProperty.LABEL], [f"Limit of {who}"])
            proc = self.model.procs.get(pid) or Proc(pid=pid, comm=name, download_limit=d,
                                                     upload_limit=u)
            if proc.uid is None:
                proc.uid = self.model.uid_lookup(pid)
            answer, why = access.process_access(self.client.permissions, proc, self.my_uid)
            if answer == access.AUTH:
                row.add_suffix(Gtk.Image.new_from_icon_name("changes-prevent-symbolic"))
            row.add_suffix(_icon_button("document-edit-symbolic", f"Edit the limit of {who}",
                                        answer, why, lambda p=proc: self.edit_process(p)))
            row.add_suffix(_icon_button("user-trash-symbolic", f"Remove the limit of {who}",
                                        answer, why, lambda p=pid, w=who: self._clear_limit(p, w)))
            self._add("limits", self.limits_group, row)

    def _clear_limit(self, pid: int, who: str) -> None:
        def done(_r: Any, err: CallError | None) -> None:
            self.toast(text.explain(err.name, err.text) if err else f"Cleared the limit of {who}")
        self.client.clear_limit(pid, done)

    # --- rules -------------------------------------------------------------------------------
    def _rebuild_rules(self) -> None:
        self._clear("rules", self.rules_group)
        if self.rules is None:
            row = Adw.ActionRow(title="This daemon has no rules yet",
                                subtitle="It does not know ListRules; update chadthrottled")
            row.add_css_class("dim-label")
            self._add("rules", self.rules_group, row)
            return
        if not self.rules:
            row = Adw.ActionRow(title="No rule",
                                subtitle="Limit a whole application from its row in Processes")
            row.add_css_class("dim-label")
            self._add("rules", self.rules_group, row)
            return
        answer, why = access.rules_access(self.client.permissions, self.client.rules_supported)
        for rule in sorted(self.rules, key=lambda r: (str(r.get("name", "")), str(r.get("id")))):
            name = str(rule.get("name") or rule.get("id") or "rule")
            row = Adw.ActionRow(title=name, subtitle=text.rule_summary(rule))
            row.set_subtitle_lines(2)
            row.update_property([Gtk.AccessibleProperty.LABEL], [f"Rule {name}"])
            if answer == access.AUTH:
                row.add_suffix(Gtk.Image.new_from_icon_name("changes-prevent-symbolic"))
            row.add_suffix(_icon_button("document-edit-symbolic", f"Edit rule {name}", answer,
                                        why, lambda r=rule: self.edit_rule(r)))
            row.add_suffix(_icon_button("user-trash-symbolic", f"Remove rule {name}", answer,
                                        why, lambda r=rule, n=name: self._remove_rule(r, n)))
            self._add("rules", self.rules_group, row)

    def _remove_rule(self, rule: dict[str, Any], name: str) -> None:
        def done(_r: Any, err: CallError | None) -> None:
            self.toast(text.explain(err.name, err.text) if err else f"Removed rule {name}")
        self.client.remove_rule(str(rule.get("id", "")), done)
