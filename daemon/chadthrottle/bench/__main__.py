"""python -m chadthrottle.bench {accuracy,homelink,overhead,control} [--json] [...]"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m chadthrottle.bench {accuracy,homelink,overhead,control} [--json] ..."
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "accuracy":
        from .accuracy import main as run
    elif cmd == "homelink":
        from .homelink import main as run
    elif cmd == "overhead":
        from .overhead import main as run
    elif cmd == "control":
        from .control import main as run
    else:
        print(usage, file=sys.stderr)
        return 2
    return run(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
