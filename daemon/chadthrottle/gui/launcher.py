"""``chadthrottle-gui``: start the applet on an interpreter that has PyGObject.

GTK comes from the distribution (python3-gi, gir1.2-gtk-4.0, gir1.2-adw-1), so the applet
must run on the system's ``/usr/bin/python3``.  ``make install`` installs the package with
that interpreter and this entry point runs there directly; when it is started from an
interpreter without ``gi`` (a virtual environment of a source checkout), it re-executes
itself on the system interpreter with this package on ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
MISSING = ("chadthrottle-gui needs GTK 4 and libadwaita for Python from the distribution: "
           "apt install python3-gi python3-gi-cairo gir1.2-gtk-4.0 gir1.2-adw-1")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if importlib.util.find_spec("gi") is None:
        if os.path.realpath(sys.executable) != os.path.realpath(SYSTEM_PYTHON) \
                and os.access(SYSTEM_PYTHON, os.X_OK):
            src = str(Path(__file__).resolve().parents[2])
            env = dict(os.environ)
            env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"]
                                       if env.get("PYTHONPATH") else "")
            os.execve(SYSTEM_PYTHON, [SYSTEM_PYTHON, "-m", "chadthrottle.gui", *argv], env)
        print(MISSING, file=sys.stderr)
        return 1
    from chadthrottle.gui.app import run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
