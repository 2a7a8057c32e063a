"""chadthrottle-gui: a GTK 4 + libadwaita desktop applet for chadthrottled.

A client of the ``org.chadthrottle.Throttle1`` system-bus interface, like
``chadthrottlectl``: it talks to the daemon through GDBus (Gio) only and imports nothing
from the engine, the service or the server.  GTK is imported only by the modules that draw
(``app``, ``window``, ``rows``, ``editor``, ``limits_page``, ``snapshot``); ``model``,
``sliders`` and ``text`` are plain Python and tested without a display.
"""

APP_ID = "org.chadthrottle.Gui"
PROGRAM_NAME = "chadthrottle-gui"
