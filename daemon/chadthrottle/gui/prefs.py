"""The applet's preferences: a small JSON file in the user's configuration directory
(``$XDG_CONFIG_HOME/chadthrottle/gui.json``).  Plain Python; unknown keys are kept."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

DEFAULTS: dict[str, Any] = {
    "notifications": False,  # off by default (issue 10)
    "active_only": False,
}


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "chadthrottle" / "gui.json"


class Prefs:
    def __init__(self, path: Path | None = None) -> None:
        self.path = path or config_path()
        self.values = dict(DEFAULTS)
        try:
            loaded = json.loads(self.path.read_text())
        except (OSError, ValueError):
            loaded = {}
        if isinstance(loaded, dict):
            for key, value in loaded.items():
                if key not in DEFAULTS or isinstance(value, type(DEFAULTS[key])):
                    self.values[key] = value

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def set(self, key: str, value: Any) -> None:
        self.values[key] = value
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.values, indent=1, sort_keys=True) + "\n")
            tmp.replace(self.path)
        except OSError:
            pass  # a read-only home: the preference holds for this session
