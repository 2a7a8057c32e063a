"""``python -m chadthrottle.cli`` = ``chadthrottlectl``."""

import sys

from chadthrottle.cli.main import main

sys.exit(main())
