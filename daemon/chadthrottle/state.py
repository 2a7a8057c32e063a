"""The daemon's runtime state: what must survive a restart of the daemon (a crash, an
upgrade, ``systemctl restart``), not a reboot.  It lives in the state dir
(``/run/chadthrottle``, see :mod:`chadthrottle.paths`), one small file per entry, so a change
costs one small atomic write however many limits there are::

    <state dir>/limits/<pid>.json   a limit set with SetLimit:
        {"pid": 4242, "start_time": 912345, "download": 51200, "upload": 0,
         "uid": 1000, "origin": "SetLimit"}
    <state dir>/units/<sha1 of the unit>.json   a limit set with SetUnitLimit:
        {"unit": "backup.service", "download": 0, "upload": 1000000, "uid": 0, ...}
    <state dir>/rules/<id>.json     a runtime rule: its bus keys and its id
    <state dir>/heirs/<pid>.json    a process that carries a rule's limit after the process
        the rule matched exited (a launcher's child running another program may match no
        rule by itself): {"pid": 4343, "start_time": 912399, "rule": "steam"}

``start_time`` is field 22 of /proc/PID/stat: a limit (or an heir) is restored only for a
process whose start time still matches (:func:`restorable`), never for a pid reused by
another process.
The state is written by the daemon alone; a damaged entry is dropped on its own and reported
(``LoadedState.problems``), the others still load.  Writes are atomic (temporary file,
rename): a crash of the daemon leaves the old entry or the new one, never half of one.  They
are not fsynced: the state lives until reboot by design (``/run`` is a tmpfs), and a change
then costs microseconds, not a disk flush (10,000 limits are set in seconds).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .atomicfile import atomic_remove, atomic_write, ensure_dir
from .errors import InvalidRule
from .rules import procinfo
from .rules.model import ID_RE, Rule, check_rate

ORIGIN_MAX = 256
PID_MAX = 1 << 22
MAX_ENTRY_BYTES = 64 * 1024
LIMITS, UNITS, RULES, HEIRS = "limits", "units", "rules", "heirs"


def _check_pid(v: int) -> int:
    if not 1 < v < PID_MAX:
        raise ValueError(f"not a process id: {v}")
    return v


def _check_start_time(v: int) -> int:
    if v < 0:
        raise ValueError(f"negative start time: {v}")
    return v


class _Frozen(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class _Process(_Frozen):
    """A process as kept in the state dir: its pid and its start time (a reused pid is never
    taken for it)."""

    pid: int
    start_time: int

    @field_validator("pid")
    @classmethod
    def _pid(cls, v: int) -> int:
        return _check_pid(v)

    @field_validator("start_time")
    @classmethod
    def _start(cls, v: int) -> int:
        return _check_start_time(v)


class _Strict(_Frozen):
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


class StoredLimit(_Strict, _Process):
    """A limit set with SetLimit, as kept in the state dir."""


class StoredUnitLimit(_Strict):
    """A limit set with SetUnitLimit, as kept in the state dir."""

    unit: str

    @field_validator("unit")
    @classmethod
    def _unit(cls, v: str) -> str:
        if not v or "\0" in v:
            raise ValueError("empty or NUL in unit")
        return v


class StoredHeir(_Process):
    """A process that carries the limit of rule ``rule`` because the process the rule
    matched (its parent, or an ancestor) exited, as kept in the state dir."""

    rule: str

    @field_validator("rule")
    @classmethod
    def _rule(cls, v: str) -> str:
        if not ID_RE.match(v):
            raise ValueError(f"not a rule id: {v!r}")
        return v


@dataclass(frozen=True)
class State:
    rules: tuple[Rule, ...] = ()  # runtime rules only
    limits: tuple[StoredLimit, ...] = ()
    unit_limits: tuple[StoredUnitLimit, ...] = ()
    heirs: tuple[StoredHeir, ...] = ()


@dataclass(frozen=True)
class LoadedState:
    state: State
    problems: tuple[str, ...] = field(default_factory=tuple)


def _unit_name(unit: str) -> str:
    return hashlib.sha1(unit.encode("utf-8")).hexdigest()


class StateDir:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._made: set[Path] = set()

    def _file(self, kind: str, name: str) -> Path:
        return self.path / kind / f"{name}.json"

    def _write(self, kind: str, name: str, data: dict[str, Any]) -> None:
        d = self.path / kind
        if d not in self._made:
            ensure_dir(d)
            self._made.add(d)
        text = json.dumps(data, ensure_ascii=False, sort_keys=True) + "\n"
        atomic_write(self._file(kind, name), text.encode("utf-8"), durable=False,
                     make_dir=False)

    # -- writes ------------------------------------------------------------------------------
    def put_limit(self, lim: StoredLimit) -> None:
        self._write(LIMITS, str(lim.pid), lim.model_dump())

    def drop_limit(self, pid: int) -> None:
        atomic_remove(self._file(LIMITS, str(pid)), durable=False)

    def put_unit(self, u: StoredUnitLimit) -> None:
        self._write(UNITS, _unit_name(u.unit), u.model_dump())

    def drop_unit(self, unit: str) -> None:
        atomic_remove(self._file(UNITS, _unit_name(unit)), durable=False)

    def put_rule(self, rule: Rule) -> None:
        if rule.permanent or rule.id is None:
            raise InvalidRule("key 'permanent': the state holds runtime rules with ids only",
                              key="permanent")
        self._write(RULES, rule.id, rule.to_bus())

    def drop_rule(self, rule_id: str) -> None:
        atomic_remove(self._file(RULES, rule_id), durable=False)

    def put_heir(self, heir: StoredHeir) -> None:
        self._write(HEIRS, str(heir.pid), heir.model_dump())

    def drop_heir(self, pid: int) -> None:
        atomic_remove(self._file(HEIRS, str(pid)), durable=False)

    def heirs(self) -> tuple[StoredHeir, ...]:
        """The heirs kept now (damaged entries are left for load() to report)."""
        out = []
        for _, data in self._entries(HEIRS, []):
            try:
                out.append(StoredHeir.model_validate(data))
            except ValidationError:
                continue
        return tuple(out)

    # -- reading -------------------------------------------------------------------------------
    def _entries(self, kind: str, problems: list[str]) -> list[tuple[Path, Any]]:
        d = self.path / kind
        try:
            names = sorted(n for n in Path(d).iterdir() if n.suffix == ".json"
                           and not n.name.startswith("."))
        except FileNotFoundError:
            return []
        except OSError as e:
            problems.append(f"{d}: cannot read: {e.strerror}")
            return []
        out = []
        for p in names:
            try:
                raw = p.read_bytes()[:MAX_ENTRY_BYTES + 1]
                if len(raw) > MAX_ENTRY_BYTES:
                    raise ValueError("too large")
                out.append((p, json.loads(raw)))
            except (OSError, ValueError) as e:
                problems.append(f"{p}: unreadable ({e}); dropped")
        return out

    def load(self) -> LoadedState:
        """The saved state (empty when there is none); never raises for its content."""
        problems: list[str] = []
        rules: list[Rule] = []
        for p, data in self._entries(RULES, problems):
            try:
                if not isinstance(data, dict):
                    raise InvalidRule("not an object")
                rule = Rule.from_bus(data)
            except InvalidRule as e:
                problems.append(f"{p}: runtime rule dropped: {e}")
                continue
            if rule.id is None or rule.permanent or rule.id != p.stem:
                problems.append(f"{p}: runtime rule dropped: it needs the file's id and must "
                                f"not be permanent")
                continue
            rules.append(rule)
        limits: list[StoredLimit] = []
        for p, data in self._entries(LIMITS, problems):
            try:
                limits.append(StoredLimit.model_validate(data))
            except ValidationError as e:
                problems.append(f"{p}: limit dropped: {e.errors()[0].get('msg')}")
        units: list[StoredUnitLimit] = []
        for p, data in self._entries(UNITS, problems):
            try:
                units.append(StoredUnitLimit.model_validate(data))
            except ValidationError as e:
                problems.append(f"{p}: unit limit dropped: {e.errors()[0].get('msg')}")
        heirs: list[StoredHeir] = []
        for p, data in self._entries(HEIRS, problems):
            try:
                heirs.append(StoredHeir.model_validate(data))
            except ValidationError as e:
                problems.append(f"{p}: heir dropped: {e.errors()[0].get('msg')}")
        return LoadedState(State(tuple(rules), tuple(limits), tuple(units), tuple(heirs)),
                           tuple(problems))


def restorable(limits: Iterable[StoredLimit | StoredHeir],
               start_time_of: Callable[[int], int | None] = procinfo.start_time,
               ) -> tuple[list, list[tuple[Any, str]]]:
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
