"""A tray icon: a StatusNotifierItem on the session bus, registered with the desktop's
StatusNotifierWatcher whenever one is there (the panels of KDE, of most other desktops, and
GNOME's AppIndicator extension).  Its tooltip carries the total rates; clicking it shows or
hides the window.  Without a watcher nothing changes: closing the window quits the applet.
With one, closing the window hides it to the tray (Quit is in the menu).

Only Gio: the item is an exported object, as the specification describes it.
"""

from __future__ import annotations

from collections.abc import Callable

import gi

gi.require_version("Gio", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

WATCHER = "org.kde.StatusNotifierWatcher"
WATCHER_PATH = "/StatusNotifierWatcher"
ITEM_PATH = "/StatusNotifierItem"
ITEM_XML = """
<node>
  <interface name="org.kde.StatusNotifierItem">
    <property name="Category" type="s" access="read"/>
    <property name="Id" type="s" access="read"/>
    <property name="Title" type="s" access="read"/>
    <property name="Status" type="s" access="read"/>
    <property name="WindowId" type="i" access="read"/>
    <property name="IconName" type="s" access="read"/>
    <property name="IconThemePath" type="s" access="read"/>
    <property name="ToolTip" type="(sa(iiay)ss)" access="read"/>
    <property name="ItemIsMenu" type="b" access="read"/>
    <property name="Menu" type="o" access="read"/>
    <method name="Activate"><arg name="x" type="i" direction="in"/>
      <arg name="y" type="i" direction="in"/></method>
    <method name="SecondaryActivate"><arg name="x" type="i" direction="in"/>
      <arg name="y" type="i" direction="in"/></method>
    <method name="ContextMenu"><arg name="x" type="i" direction="in"/>
      <arg name="y" type="i" direction="in"/></method>
    <method name="Scroll"><arg name="delta" type="i" direction="in"/>
      <arg name="orientation" type="s" direction="in"/></method>
    <signal name="NewToolTip"/>
    <signal name="NewStatus"><arg name="status" type="s"/></signal>
  </interface>
</node>
"""


class TrayItem:
    def __init__(self, conn: Gio.DBusConnection, *, icon: str, icon_path: str,
                 on_activate: Callable[[], None]) -> None:
        self.conn = conn
        self.icon = icon
        self.icon_path = icon_path
        self.on_activate = on_activate
        self.tooltip = "chadthrottle"
        self.status = "Active"
        self.registered = False
        self._reg_id = 0
        self._watch_id = 0
        self._info = Gio.DBusNodeInfo.new_for_xml(ITEM_XML).interfaces[0]

    def start(self) -> None:
        self._reg_id = self.conn.register_object(ITEM_PATH, self._info, self._call,
                                                 self._get, None)
        self._watch_id = Gio.bus_watch_name_on_connection(
            self.conn, WATCHER, Gio.BusNameWatcherFlags.NONE, self._watcher_up,
            self._watcher_down)

    def stop(self) -> None:
        if self._watch_id:
            Gio.bus_unwatch_name(self._watch_id)
            self._watch_id = 0
        if self._reg_id:
            self.conn.unregister_object(self._reg_id)
            self._reg_id = 0
        self.registered = False

    # --- the watcher ---------------------------------------------------------------------
    def _watcher_up(self, conn: Gio.DBusConnection, _name: str, _owner: str) -> None:
        def done(c: Gio.DBusConnection, res: Gio.AsyncResult) -> None:
            try:
                c.call_finish(res)
                self.registered = True
            except GLib.Error:
                self.registered = False

        conn.call(WATCHER, WATCHER_PATH, WATCHER, "RegisterStatusNotifierItem",
                  GLib.Variant("(s)", (conn.get_unique_name(),)), None,
                  Gio.DBusCallFlags.NONE, 10_000, None, done)

    def _watcher_down(self, _conn: Gio.DBusConnection | None, _name: str) -> None:
        self.registered = False

    # --- the item ------------------------------------------------------------------------
    def set_tooltip(self, text: str) -> None:
        if text != self.tooltip:
            self.tooltip = text
            self._signal("NewToolTip", None)

    def set_status(self, status: str) -> None:
        """``Active``, or ``Passive`` while the daemon is not running."""
        if status != self.status:
            self.status = status
            self._signal("NewStatus", GLib.Variant("(s)", (status,)))

    def _signal(self, name: str, params: GLib.Variant | None) -> None:
        if self._reg_id and not self.conn.is_closed():
            self.conn.emit_signal(None, ITEM_PATH, self._info.name, name, params)

    def _get(self, _conn, _sender, _path, _iface, prop: str) -> GLib.Variant | None:
        values = {
            "Category": GLib.Variant("s", "ApplicationStatus"),
            "Id": GLib.Variant("s", "chadthrottle"),
            "Title": GLib.Variant("s", "chadthrottle"),
            "Status": GLib.Variant("s", self.status),
            "WindowId": GLib.Variant("i", 0),
            "IconName": GLib.Variant("s", self.icon),
            "IconThemePath": GLib.Variant("s", self.icon_path),
            "ToolTip": GLib.Variant("(sa(iiay)ss)", (self.icon, [], "chadthrottle",
                                                     self.tooltip)),
            "ItemIsMenu": GLib.Variant("b", False),
            "Menu": GLib.Variant("o", "/NO_DBUSMENU"),
        }
        return values.get(prop)

    def _call(self, _conn, _sender, _path, _iface, method: str, _params: GLib.Variant,
              invocation: Gio.DBusMethodInvocation) -> None:
        if method in ("Activate", "SecondaryActivate", "ContextMenu"):
            self.on_activate()
        invocation.return_value(None)
