"""Where permanent rules live, and how the daemon writes files (atomically).

**Permanent rules** (:class:`RuleFiles`): ``<config dir>/rules.d/<id>.toml``, one rule a
file, the rule keys without ``permanent`` (a file *is* a permanent rule) and without ``id``
(the file name is the id).  The directory is loaded as a whole: one broken file and the load
fails with :class:`~chadthrottle.errors.InvalidRule` naming the file and the key; nothing is
returned, so the caller keeps the rules it had.  Only ``*.toml`` files whose name does not
start with a dot are read (editor backups and our own temporary files are skipped).

The runtime state (limits, runtime rules) is kept by :mod:`chadthrottle.state`.

Every write is atomic and durable (:mod:`chadthrottle.atomicfile`).  Files are 0644;
directories the store creates are 0755 (and owned by the daemon's user: root).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..atomicfile import atomic_remove, atomic_write
from ..errors import InvalidRule
from .model import ID_RE, Rule

RULE_FILE_SUFFIX = ".toml"
MAX_RULE_FILE_BYTES = 64 * 1024


# --- permanent rules --------------------------------------------------------------------------
class RuleFiles:
    """The permanent rules of ``rules_dir`` (``<config dir>/rules.d``)."""

    def __init__(self, rules_dir: Path | str) -> None:
        self.dir = Path(rules_dir)

    def path_of(self, rule_id: str) -> Path:
        if not ID_RE.match(rule_id):
            raise InvalidRule(f"key 'id': {rule_id!r} is not a rule id", key="id")
        return self.dir / f"{rule_id}{RULE_FILE_SUFFIX}"

    def _files(self) -> list[Path]:
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise InvalidRule(f"{self.dir}: cannot read the directory: {e.strerror}",
                              source=str(self.dir)) from None
        return [self.dir / n for n in sorted(names)
                if n.endswith(RULE_FILE_SUFFIX) and not n.startswith(".")]

    def load_file(self, path: Path) -> Rule:
        source = str(path)
        rule_id = path.name[:-len(RULE_FILE_SUFFIX)]
        if not ID_RE.match(rule_id):
            raise InvalidRule(
                f"{source}: the file name must be <id>.toml with an id of 1 to 64 characters "
                f"of a-z 0-9 _ . - starting with a letter or digit", key="id", source=source)
        if not path.is_file():  # never open a fifo or a device
            raise InvalidRule(f"{source}: not a regular file", source=source)
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_RULE_FILE_BYTES + 1)
        except OSError as e:
            raise InvalidRule(f"{source}: cannot read: {e.strerror}", source=source) from None
        if len(raw) > MAX_RULE_FILE_BYTES:
            raise InvalidRule(f"{source}: larger than {MAX_RULE_FILE_BYTES} bytes",
                              source=source)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRule(f"{source}: not UTF-8 text (byte {e.start})",
                              source=source) from None
        return Rule.from_toml(text, rule_id, source)

    def load(self) -> tuple[Rule, ...]:
        """Every permanent rule, by id; InvalidRule (naming the file and the key) if any file
        is broken — then nothing is returned."""
        return tuple(self.load_file(p) for p in self._files())

    def write(self, rule: Rule) -> Path:
        """Write (or replace) the file of a permanent rule."""
        if rule.id is None or not rule.permanent:
            raise InvalidRule("key 'permanent': only a permanent rule with an id has a file",
                              key="permanent")
        path = self.path_of(rule.id)
        atomic_write(path, rule.to_toml().encode("utf-8"))
        return path

    def remove(self, rule_id: str) -> bool:
        """Remove the file of rule ``rule_id``; False if there was none."""
        return atomic_remove(self.path_of(rule_id))
