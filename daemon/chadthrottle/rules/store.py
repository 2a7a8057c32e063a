"""Where rules and limits live between runs of the daemon.

**Permanent rules** (:class:`RuleFiles`): ``<config dir>/rules.d/<id>.toml``, one rule a
file, the rule keys without ``permanent`` (a file *is* a permanent rule) and without ``id``
(the file name is the id).  The directory is loaded as a whole: one broken file and the load
fails with :class:`~chadthrottle.errors.InvalidRule` naming the file and the key; nothing is
returned, so the caller keeps the rules it had.  Only ``*.toml`` files whose name does not
start with a dot are read (editor backups and our own temporary files are skipped).

**Runtime state** (:class:`StateFile`): ``<state dir>/state.json``, written after every
change and read at start::

    {"version": 1,
     "rules": [{"id": "wget", "comm": "wget", "download": 51200, ...}],
     "limits": [{"pid": 4242, "start_time": 912345, "download": 51200, "upload": 0,
                 "uid": 1000, "origin": "SetLimit"}],
     "unit_limits": [{"unit": "backup.service", "download": 0, "upload": 1000000,
                      "uid": 0, "origin": "SetUnitLimit"}]}

``rules`` are the runtime (non-permanent) rules, with the bus keys and ``id``; ``limits`` the
explicit SetLimit limits with the process's start time (field 22 of /proc/PID/stat) and who
set them (their uid and an origin text the daemon chooses).  A limit is restored only for a
process whose start time still matches (:func:`restorable`): a pid reused by another process
is never limited.  The state is written by the daemon alone; a damaged entry is dropped on
its own and reported (``LoadedState.problems``), the others still load.

Every write is atomic: a temporary file in the same directory, fsync, rename over the old
name, fsync of the directory.  Files are 0644; directories the store creates are 0755 (and
owned by the daemon's user: root).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..errors import InvalidRule
from . import procinfo
from .model import ID_RE, Rule, check_rate

RULE_FILE_SUFFIX = ".toml"
MAX_RULE_FILE_BYTES = 64 * 1024
FILE_MODE = 0o644
DIR_MODE = 0o755
STATE_VERSION = 1
ORIGIN_MAX = 256
PID_MAX = 1 << 22


# --- atomic files -----------------------------------------------------------------------------
def ensure_dir(path: Path, mode: int = DIR_MODE) -> None:
    """Create ``path`` and its missing parents with ``mode`` (whatever the umask)."""
    missing = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=mode)
        except FileExistsError:
            continue
        os.chmod(d, mode)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never a part."""
    path = Path(path)
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_remove(path: Path) -> bool:
    """Remove ``path``; False if it did not exist."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    fsync_dir(Path(path).parent)
    return True


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


# --- runtime state ----------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    download: int = 0
    upload: int = 0
    uid: int
    origin: str = ""

    @field_validator("download", "upload")
    @classmethod
    def _rate(cls, v: int) -> int:
        return check_rate(v)

    @field_validator("uid")
    @classmethod
    def _uid(cls, v: int) -> int:
        if not 0 <= v < 2**32:
            raise ValueError(f"not a uid: {v}")
        return v

    @field_validator("origin")
    @classmethod
    def _origin(cls, v: str) -> str:
        if len(v) > ORIGIN_MAX:
            raise ValueError(f"longer than {ORIGIN_MAX} characters")
        return v

    @model_validator(mode="after")
    def _some_limit(self):
        if not self.download and not self.upload:
            raise ValueError("download and upload are both 0")
        return self


class StoredLimit(_Strict):
    """A limit set with SetLimit, as kept in the state dir."""

    pid: int
    start_time: int

    @field_validator("pid")
    @classmethod
    def _pid(cls, v: int) -> int:
        if not 1 < v < PID_MAX:
            raise ValueError(f"not a process id: {v}")
        return v

    @field_validator("start_time")
    @classmethod
    def _start(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"negative start time: {v}")
        return v


class StoredUnitLimit(_Strict):
    """A limit set with SetUnitLimit, as kept in the state dir."""

    unit: str

    @field_validator("unit")
    @classmethod
    def _unit(cls, v: str) -> str:
        if not v or "\0" in v:
            raise ValueError("empty or NUL in unit")
        return v


@dataclass(frozen=True)
class State:
    rules: tuple[Rule, ...] = ()  # runtime rules only
    limits: tuple[StoredLimit, ...] = ()
    unit_limits: tuple[StoredUnitLimit, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "rules": [r.to_bus() for r in sorted(self.rules, key=lambda r: r.id or "")],
            "limits": [lim.model_dump() for lim in sorted(self.limits, key=lambda x: x.pid)],
            "unit_limits": [u.model_dump() for u in sorted(self.unit_limits,
                                                            key=lambda x: x.unit)],
        }


@dataclass(frozen=True)
class LoadedState:
    state: State
    problems: tuple[str, ...] = field(default_factory=tuple)


def _entries(data: Mapping[str, Any], key: str, problems: list[str], source: str) -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        problems.append(f"{source}: {key!r} is not a list; ignored")
        return []
    return value


def state_from_json(data: Any, source: str) -> LoadedState:
    """Parse the state file's JSON; bad entries are dropped one by one, with a problem each."""
    problems: list[str] = []
    if not isinstance(data, dict):
        return LoadedState(State(), (f"{source}: not a JSON object; ignored",))
    if data.get("version") != STATE_VERSION:
        return LoadedState(State(), (f"{source}: version {data.get('version')!r} is not "
                                     f"{STATE_VERSION}; ignored",))
    unknown = sorted(set(data) - {"version", "rules", "limits", "unit_limits"})
    if unknown:
        problems.append(f"{source}: unknown keys {unknown} ignored")
    rules: list[Rule] = []
    seen: set[str] = set()
    for entry in _entries(data, "rules", problems, source):
        try:
            if not isinstance(entry, dict):
                raise InvalidRule("not an object")
            rule = Rule.from_bus(entry)
        except InvalidRule as e:
            problems.append(f"{source}: runtime rule dropped: {e}")
            continue
        if rule.id is None or rule.permanent or rule.id in seen:
            problems.append(f"{source}: runtime rule {rule.id!r} dropped: it needs a unique id "
                            f"and must not be permanent")
            continue
        seen.add(rule.id)
        rules.append(rule)
    limits: list[StoredLimit] = []
    for entry in _entries(data, "limits", problems, source):
        try:
            limits.append(StoredLimit.model_validate(entry))
        except ValidationError as e:
            problems.append(f"{source}: limit {entry!r:.80} dropped: "
                            f"{e.errors()[0].get('msg')}")
    units: list[StoredUnitLimit] = []
    for entry in _entries(data, "unit_limits", problems, source):
        try:
            units.append(StoredUnitLimit.model_validate(entry))
        except ValidationError as e:
            problems.append(f"{source}: unit limit {entry!r:.80} dropped: "
                            f"{e.errors()[0].get('msg')}")
    return LoadedState(State(tuple(rules), tuple(limits), tuple(units)), tuple(problems))


class StateFile:
    """``<state dir>/state.json``."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def load(self) -> LoadedState:
        """The saved state (empty when there is none); never raises for its content."""
        source = str(self.path)
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return LoadedState(State())
        except OSError as e:
            return LoadedState(State(), (f"{source}: cannot read: {e.strerror}",))
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return LoadedState(State(), (f"{source}: not valid JSON ({e}); ignored",))
        return state_from_json(data, source)

    def save(self, state: State) -> None:
        if any(r.permanent or r.id is None for r in state.rules):
            raise InvalidRule("key 'permanent': the state holds runtime rules with ids only",
                              key="permanent")
        text = json.dumps(state.to_json(), indent=1, ensure_ascii=False) + "\n"
        atomic_write(self.path, text.encode("utf-8"))


def restorable(limits: Iterable[StoredLimit],
               start_time_of: Callable[[int], int | None] = procinfo.start_time,
               ) -> tuple[list[StoredLimit], list[tuple[StoredLimit, str]]]:
    """(limits whose process still runs, (limit, why not) for the others).  A process is
    the same only if its start time is the stored one: a reused pid is refused."""
    keep: list[StoredLimit] = []
    drop: list[tuple[StoredLimit, str]] = []
    for lim in limits:
        now = start_time_of(lim.pid)
        if now is None:
            drop.append((lim, "exited"))
        elif now != lim.start_time:
            drop.append((lim, f"pid reused (start time {now}, stored {lim.start_time})"))
        else:
            keep.append(lim)
    return keep, drop
