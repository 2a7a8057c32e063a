"""Pictures of the applet's own windows, drawn by GTK itself, for the README's screenshots
and the tests that take them: the window's Gtk.WidgetPaintable is snapshotted and rendered
by the window's own renderer into a texture saved as PNG.

PyGObject 3.42 (Debian 12) cannot pass GskRenderNode, a fundamental type, to Python, so the
three calls that handle the node go through ctypes on the same GTK library; everything else
is ordinary PyGObject.  PyGObject's hash() of a GObject is the address of the C object.
"""

from __future__ import annotations

import ctypes

import gi

gi.require_version("Gtk", "4.0")
from gi.repository import Gtk  # noqa: E402


class _Rect(ctypes.Structure):  # graphene_rect_t: origin (x, y), size (width, height)
    _fields_ = [("x", ctypes.c_float), ("y", ctypes.c_float),
                ("width", ctypes.c_float), ("height", ctypes.c_float)]


_gtk = ctypes.CDLL("libgtk-4.so.1")
_gtk.gtk_snapshot_to_node.argtypes = [ctypes.c_void_p]
_gtk.gtk_snapshot_to_node.restype = ctypes.c_void_p
_gtk.gsk_renderer_render_texture.argtypes = [ctypes.c_void_p, ctypes.c_void_p,
                                             ctypes.POINTER(_Rect)]
_gtk.gsk_renderer_render_texture.restype = ctypes.c_void_p
_gtk.gdk_texture_save_to_png.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_gtk.gdk_texture_save_to_png.restype = ctypes.c_int
_gtk.gsk_render_node_unref.argtypes = [ctypes.c_void_p]
_gtk.gsk_render_node_unref.restype = None
_gobject = ctypes.CDLL("libgobject-2.0.so.0")
_gobject.g_object_unref.argtypes = [ctypes.c_void_p]
_gobject.g_object_unref.restype = None


def _address(obj) -> int:
    return hash(obj) & ((1 << (8 * ctypes.sizeof(ctypes.c_void_p))) - 1)


def save_png(window: Gtk.Window, path: str) -> tuple[int, int]:
    """Render ``window`` as it is on screen now into a PNG; its size in pixels."""
    width, height = window.get_width(), window.get_height()
    if width <= 0 or height <= 0:
        raise RuntimeError("the window is not shown")
    renderer = window.get_renderer()
    if renderer is None:
        raise RuntimeError("the window has no renderer yet")
    paintable = Gtk.WidgetPaintable.new(window)
    snap = Gtk.Snapshot()
    paintable.snapshot(snap, width, height)
    node = _gtk.gtk_snapshot_to_node(_address(snap))
    if not node:
        raise RuntimeError("the window drew nothing")
    try:
        rect = _Rect(0.0, 0.0, float(width), float(height))
        texture = _gtk.gsk_renderer_render_texture(_address(renderer), node, ctypes.byref(rect))
    finally:
        _gtk.gsk_render_node_unref(node)
    if not texture:
        raise RuntimeError("the renderer made no texture")
    try:
        if not _gtk.gdk_texture_save_to_png(texture, path.encode()):
            raise RuntimeError(f"could not write {path}")
    finally:
        _gobject.g_object_unref(texture)
    return width, height
