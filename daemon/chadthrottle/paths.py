"""Where chadthrottled keeps its configuration and its runtime state (DESIGN.md §2b).

* config dir: ``/etc/chadthrottle``; permanent rules in ``<config dir>/rules.d/<id>.toml``,
  the daemon's settings in ``<config dir>/chadthrottled.toml`` (:mod:`chadthrottle.config`);
* state dir: ``/run/chadthrottle``; runtime rules and the limits set with SetLimit, one file
  per entry (see :mod:`chadthrottle.state`; survives a daemon restart, not a reboot).

Each is overridden by its command-line option, else by its environment variable
(``CHADTHROTTLE_CONFIG_DIR``, ``CHADTHROTTLE_STATE_DIR``; an empty value counts as unset).
Both must be absolute paths: the daemon is started by systemd, from no particular directory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CONFIG_DIR = "/etc/chadthrottle"
DEFAULT_STATE_DIR = "/run/chadthrottle"
ENV_CONFIG_DIR = "CHADTHROTTLE_CONFIG_DIR"
ENV_STATE_DIR = "CHADTHROTTLE_STATE_DIR"
RULES_SUBDIR = "rules.d"
SETTINGS_FILE = "chadthrottled.toml"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class Paths:
    config_dir: Path
    state_dir: Path

    @property
    def rules_dir(self) -> Path:
        return self.config_dir / RULES_SUBDIR

    @property
    def settings_file(self) -> Path:
        return self.config_dir / SETTINGS_FILE

    @property
    def state_file(self) -> Path:
        return self.state_dir / STATE_FILE


def _pick(option: str | None, env_name: str, environ: Mapping[str, str], default: str,
          what: str) -> Path:
    if option:
        value, source = option, f"--{what}"
    elif environ.get(env_name):
        value, source = environ[env_name], f"${env_name}"
    else:
        value, source = default, "default"
    if "\0" in value or not value.startswith("/"):
        raise ValueError(f"{source}: the {what.replace('-', ' ')} must be an absolute path, "
                         f"not {value!r}")
    return Path(value)


def resolve(config_dir: str | None, state_dir: str | None,
            environ: Mapping[str, str]) -> Paths:
    """The directories from the options (None when not given) and the environment; raises
    ValueError naming the option or variable when a value is not an absolute path."""
    return Paths(
        config_dir=_pick(config_dir, ENV_CONFIG_DIR, environ, DEFAULT_CONFIG_DIR, "config-dir"),
        state_dir=_pick(state_dir, ENV_STATE_DIR, environ, DEFAULT_STATE_DIR, "state-dir"),
    )
