#!/usr/bin/env python3
"""Print, one per line, the runtime requirements of pyproject.toml that this Python does not
satisfy (``make install`` then installs only those, with pip).  The distribution's packages
come first: on Debian 12, python3-dbus-fast, python3-rich, python3-tomli-w and
python3-prometheus-client satisfy theirs; pydantic 2 is not packaged there and comes from
pip.  The download queues run iproute2's ip and tc (a Debian package, not a Python one)."""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement


def missing(pyproject: Path) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    out = []
    for spec in deps:
        req = Requirement(spec)
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            out.append(spec)
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(spec)
    return out


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    print("\n".join(missing(root / "pyproject.toml")))
