"""The main list's widgets: column layout, the 60-second sparkline, and the rows of an
application and of a process.

Every row's accessible name says what it is — ``curl (PID 1234)`` for a process,
``curl (application, 2 processes)`` for an application — so a screen reader (and the
AT-SPI test) can find it; the buttons in it say what they act on.
"""

from __future__ import annotations

from collections.abc import Callable

import gi

gi.require_version("Gtk", "4.0")
from gi.repository import Gtk, Pango  # noqa: E402

from chadthrottle.gui import text  # noqa: E402
from chadthrottle.gui.model import App, Proc  # noqa: E402
from chadthrottle.units import format_bytes, format_rate  # noqa: E402

# (key, header, width in pixels; 0 = takes the remaining width)
COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("name", "Application / process", 0),
    ("down", "↓ Download", 92),
    ("up", "↑ Upload", 92),
    ("spark", "Last 60 s", 96),
    ("total", "Total ↓ / ↑", 132),
    ("limit", "Limit", 178),
    ("status", "Status", 118),
    ("user", "User", 72),
)
WIDTH = {key: width for key, _, width in COLUMNS}
SPACING = 10
INDENT = 28

DOWNLOAD_RGB = (0.21, 0.52, 0.89)  # the header's ↓ colour
UPLOAD_RGB = (0.90, 0.38, 0.0)  # ↑
MIN_SCALE = 1000.0  # a sparkline's full height is at least 1 KB/s


def header_row() -> Gtk.Box:
    box = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=SPACING)
    box.add_css_class("ct-header")
    for key, title, width in COLUMNS:
        label = Gtk.Label(label=title, xalign=0.0 if key in ("name", "limit", "status",
                                                              "user", "spark") else 1.0)
        label.add_css_class("caption-heading")
        label.add_css_class("dim-label")
        if key == "name":
            label.set_hexpand(True)
            label.set_margin_start(INDENT + 4)
        elif key == "limit":  # the cells are flat buttons: their text starts inside a padding
            label.set_size_request(width - 10, -1)
            label.set_margin_start(10)
        else:
            label.set_size_request(width, -1)
        box.append(label)
    return box


class Sparkline(Gtk.DrawingArea):
    """60 seconds of download (filled) and upload (line) rate, on one scale."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[tuple[float, float]] = []
        self.set_size_request(WIDTH["spark"], 26)
        self.set_valign(Gtk.Align.CENTER)
        self.set_draw_func(self._draw)

    def set_samples(self, samples) -> None:
        self.samples = list(samples)
        self.queue_draw()

    def _draw(self, _area: Gtk.DrawingArea, cr, width: int, height: int) -> None:
        from chadthrottle.gui.model import HISTORY

        cr.set_source_rgba(0.5, 0.5, 0.5, 0.10)
        cr.rectangle(0, 0, width, height)
        cr.fill()
        if not self.samples:
            return
        top = max(MIN_SCALE, max(max(d, u) for d, u in self.samples))
        step = width / (HISTORY - 1)
        x0 = width - step * (len(self.samples) - 1)

        def y(v: float) -> float:
            return height - 1 - (height - 2) * min(v / top, 1.0)

        # download: a filled area
        cr.move_to(x0, height)
        for i, (d, _u) in enumerate(self.samples):
            cr.line_to(x0 + i * step, y(d))
        cr.line_to(x0 + (len(self.samples) - 1) * step, height)
        cr.close_path()
        cr.set_source_rgba(*DOWNLOAD_RGB, 0.35)
        cr.fill_preserve()
        cr.set_source_rgba(*DOWNLOAD_RGB, 0.9)
        cr.set_line_width(1.0)
        cr.stroke()
        # upload: a line
        for i, (_d, u) in enumerate(self.samples):
            (cr.move_to if i == 0 else cr.line_to)(x0 + i * step, y(u))
        cr.set_source_rgba(*UPLOAD_RGB, 0.95)
        cr.set_line_width(1.2)
        cr.stroke()


def _cell_label(key: str, xalign: float = 1.0) -> Gtk.Label:
    label = Gtk.Label(xalign=xalign)
    label.set_size_request(WIDTH[key], -1)
    label.add_css_class("numeric")
    return label


class BaseRow(Gtk.ListBoxRow):
    """The columns every row has; subclasses fill the name cell and the texts."""

    def __init__(self, on_limit: Callable[[BaseRow], None]) -> None:
        super().__init__()
        self.set_activatable(True)
        self._texts: dict[str, object] = {}
        box = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=SPACING)
        box.set_margin_top(5)
        box.set_margin_bottom(5)
        self.name_box = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=6)
        self.name_box.set_hexpand(True)
        titles = Gtk.Box(orientation=Gtk.Orientation.VERTICAL)
        titles.set_valign(Gtk.Align.CENTER)
        self.title = Gtk.Label(xalign=0.0, ellipsize=Pango.EllipsizeMode.END)
        self.subtitle = Gtk.Label(xalign=0.0, ellipsize=Pango.EllipsizeMode.END)
        self.subtitle.add_css_class("caption")
        self.subtitle.add_css_class("dim-label")
        titles.append(self.title)
        titles.append(self.subtitle)
        self.titles = titles
        self.down = _cell_label("down")
        self.up = _cell_label("up")
        self.spark = Sparkline()
        self.total = _cell_label("total")
        self.total.add_css_class("caption")
        self.limit_button = Gtk.Button()
        self.limit_button.add_css_class("flat")
        self.limit_button.set_size_request(WIDTH["limit"], -1)
        inner = Gtk.Box(orientation=Gtk.Orientation.HORIZONTAL, spacing=4)
        self.lock = Gtk.Image.new_from_icon_name("changes-prevent-symbolic")
        self.lock.set_visible(False)
        self.limit_label = Gtk.Label(xalign=0.0, ellipsize=Pango.EllipsizeMode.END)
        self.limit_label.add_css_class("numeric")
        inner.append(self.lock)
        inner.append(self.limit_label)
        self.limit_button.set_child(inner)
        self.limit_button.connect("clicked", lambda _b: on_limit(self))
        self.status = _cell_label("status", 0.0)
        self.user = _cell_label("user", 0.0)
        self.user.set_ellipsize(Pango.EllipsizeMode.END)
        for w in (self.name_box, self.down, self.up, self.spark, self.total, self.limit_button,
                  self.status, self.user):
            box.append(w)
        self.set_child(box)

    def _set(self, widget: Gtk.Label, key: str, value: str) -> None:
        if self._texts.get(key) != value:
            self._texts[key] = value
            widget.set_label(value)

    def _set_common(self, down: float, up: float, dbytes: int, ubytes: int, status: str,
                    user: str, history) -> None:
        self._set(self.down, "down", format_rate(down))
        self._set(self.up, "up", format_rate(up))
        self._set(self.total, "total", f"{format_bytes(dbytes)} / {format_bytes(ubytes)}")
        self._set(self.user, "user", user)
        self._set(self.status, "status", text.status_label(status))
        if self._texts.get("status_key") != status:
            self._texts["status_key"] = status
            self.status.set_tooltip_text(text.STATUS_TOOLTIP.get(status))
            for cls in ("success", "error", "dim-label"):
                self.status.remove_css_class(cls)
            if status in text.BAD_STATUSES:
                self.status.add_css_class("error")
            elif status == "throttled":
                self.status.add_css_class("success")
            else:
                self.status.add_css_class("dim-label")
        self.spark.set_samples(history)

    def set_access(self, answer: str, reason: str) -> None:
        """GetPermissions' word for what this row's limit button leads to."""
        if self._texts.get("access") == (answer, reason):
            return
        self._texts["access"] = (answer, reason)
        self.lock.set_visible(answer == "auth")
        self.limit_button.set_sensitive(answer != "no")
        self.limit_button.set_tooltip_text(reason or None)

    def _accessible(self, name: str, button: str) -> None:
        if self._texts.get("a11y") != name:
            self._texts["a11y"] = name
            self.update_property([Gtk.AccessibleProperty.LABEL], [name])
            self.limit_button.update_property([Gtk.AccessibleProperty.LABEL], [button])


class AppRow(BaseRow):
    def __init__(self, app: App, on_limit, on_toggle: Callable[[AppRow], None]) -> None:
        super().__init__(on_limit)
        self.app = app
        self.expanded = False
        self.expander = Gtk.Button(icon_name="pan-end-symbolic")
        self.expander.add_css_class("flat")
        self.expander.set_valign(Gtk.Align.CENTER)
        self.expander.set_size_request(INDENT, -1)
        self.expander.connect("clicked", lambda _b: on_toggle(self))
        icon = Gtk.Image.new_from_icon_name("application-x-executable-symbolic")
        self.title.add_css_class("heading")
        self.name_box.append(self.expander)
        self.name_box.append(icon)
        self.name_box.append(self.titles)
        self.update()

    def set_expanded(self, expanded: bool) -> None:
        self.expanded = expanded
        self.expander.set_icon_name("pan-down-symbolic" if expanded else "pan-end-symbolic")
        self.update_state([Gtk.AccessibleState.EXPANDED], [int(expanded)])
        self._texts.pop("expander", None)
        self.update()

    def update(self) -> None:
        app = self.app
        n = len(app.procs)
        self._set(self.title, "title", app.name)
        where = app.exe or f"comm {app.comm}"
        self._set(self.subtitle, "subtitle",
                  f"{n} process{'es' if n != 1 else ''} · {where}")
        common = app.common_limit
        if app.limited_count == 0:
            limit = "No limit"
        elif common is not None:
            limit = text.limits_short(*common)
        else:
            limit = f"{app.limited_count} of {n} limited"
        if app.rules:
            limit += " · rule"
        self._set(self.limit_label, "limit", limit)
        self._set_common(app.download_rate, app.upload_rate, app.download_bytes,
                         app.upload_bytes, app.status, app.user, app.history)
        self._accessible(app.accessible_name, f"Set limit of application {app.name}")
        action = "Collapse" if self.expanded else "Expand"
        if self._texts.get("expander") != action:
            self._texts["expander"] = action
            self.expander.update_property([Gtk.AccessibleProperty.LABEL],
                                          [f"{action} {app.name}"])
            self.expander.set_tooltip_text(f"{action}: its processes")


class ProcRow(BaseRow):
    def __init__(self, proc: Proc, on_limit) -> None:
        super().__init__(on_limit)
        self.proc = proc
        spacer = Gtk.Box()
        spacer.set_size_request(INDENT + 22, -1)
        self.name_box.append(spacer)
        self.name_box.append(self.titles)
        self.update()

    def update(self) -> None:
        p = self.proc
        self._set(self.title, "title", p.name)
        sub = f"PID {p.pid}"
        if p.unit:
            sub += f" · {p.unit}"
        elif p.cgroup and p.cgroup != "/":
            sub += f" · {p.cgroup}"
        self._set(self.subtitle, "subtitle", sub)
        limit = text.limits_short(p.download_limit, p.upload_limit)
        if p.rule:
            limit += " · rule"
        self._set(self.limit_label, "limit", limit)
        self._set_common(p.download_rate, p.upload_rate, p.download_bytes, p.upload_bytes,
                         p.status, p.user, p.history)
        self._accessible(p.accessible_name, f"Set limit of {p.accessible_name}")
