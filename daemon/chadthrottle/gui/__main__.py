"""``python3 -m chadthrottle.gui`` (on the system interpreter): the desktop applet."""

import sys

from chadthrottle.gui.launcher import main

sys.exit(main())
