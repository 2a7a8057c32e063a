"""One model for rules, whether they come from a file or from the bus (DESIGN.md §2b).

Keys: ``name`` (a label); the match keys ``exe`` (absolute path, ``*``/``?`` globs: see
:mod:`chadthrottle.rules.glob`), ``comm`` (the kernel's process name, exact, at most 15
bytes), ``cmdline`` (a Python regular expression searched in the arguments joined by single
spaces), ``uid`` (real uid, u32), ``unit`` (a systemd unit name — it matches a cgroup of
that name at any depth and everything below it — or a cgroup path relative to the cgroup2
mount, ``/system.slice/backup.service``, which matches that cgroup and everything below
it); ``scope`` ``process`` (each matching process and its children get a budget of their
own) or ``application`` (every matching process shares one budget); ``download`` and
``upload`` in bytes/s (0 or 1,024 … 2^40, at least one non-zero); ``permanent`` (default
false: a runtime rule, kept in the state dir until reboot; true: a file in ``rules.d``);
``enabled`` (default true).  At least one match key; all the match keys given must hold.

Validation is strict: ``uid`` must be an integer (not ``"1000"``), the booleans booleans,
the rates integers (not ``5e6``).  Every failure is an :class:`~chadthrottle.errors.InvalidRule`
whose message names the key (and, for a file, the file).

Ids: a rule's ``id`` is a safe file-name stem, ``[a-z0-9][a-z0-9_.-]{0,63}``; a permanent
rule lives in ``rules.d/<id>.toml``.  A rule from the bus may carry ``id``; otherwise one is
made from its ``name`` (or its match keys) by :func:`make_id`, unique among the ids taken.

Precedence (:func:`precedence_key`): a process that several enabled rules match is limited by
exactly one of them, the first in this order:

1. the rule with more match keys (``exe`` + ``uid`` before ``exe`` alone);
2. a rule whose ``exe`` is an exact path, then one whose ``exe`` is a glob (the glob with
   more literal, non-wildcard characters first), then a rule without ``exe``;
3. the smaller id (plain string order).

An explicit limit set with SetLimit on a process always wins over every rule (the engine
enforces that).
"""

from __future__ import annotations

import functools
import re
import tomllib
import unicodedata
from collections.abc import Collection, Mapping
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .. import errortext, names
from ..errors import InvalidRule
from . import glob

ID_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}\Z")
ID_MAX = 64
COMM_MAX_BYTES = 15
NAME_MAX = 256
CMDLINE_MAX = 1024
UNIT_MAX = 4096
UID_MAX = 2**32 - 2  # (uid_t)-1 is "no uid"
MATCH_KEYS = names.RULE_MATCH_KEYS
RULE_KEYS = tuple(names.RULE_KEY_SIGNATURES)
#: keys a rule file may hold: every rule key but ``permanent`` (a file *is* permanent)
FILE_KEYS = tuple(k for k in RULE_KEYS if k != "permanent")
#: the systemd unit name alphabet (systemd.unit(5)); cgroup paths use '/' between names
_UNIT_NAME_RE = re.compile(r"[A-Za-z0-9:_.\\@-]+\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
FILE_HEADER = ("# A chadthrottle rule (see the README, section Rules). After editing, run\n"
               "# 'chadthrottlectl rule reload' (or 'systemctl reload chadthrottled').\n")


@functools.lru_cache(maxsize=1024)
def compile_cmdline(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def check_rate(value: int) -> int:
    if value != 0 and not names.RATE_MIN <= value <= names.RATE_MAX:
        raise ValueError(f"must be 0 (no limit) or {names.RATE_MIN} … {names.RATE_MAX} "
                         f"bytes/s, not {value}")
    return value


def _no_control(value: str) -> None:
    if _CONTROL.search(value):
        raise ValueError(f"must not contain control characters ({value!r})")


def _not_empty(value: str) -> None:
    if value == "":
        raise ValueError("must not be empty (leave the key out instead)")


def unit_parts(unit: str) -> list[str]:
    """The cgroup path components of a path-form ``unit`` ('/a/b' and 'a/b' -> ['a', 'b'])."""
    return [p for p in unit.split("/") if p]


def is_unit_path(unit: str) -> bool:
    return "/" in unit


class Rule(BaseModel):
    """A validated, immutable rule.  Build one with :meth:`from_bus` or :meth:`from_file`
    (or :meth:`from_toml`) to get :class:`InvalidRule` errors that name the key."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    id: str | None = None
    name: str = ""
    exe: str | None = None
    comm: str | None = None
    cmdline: str | None = None
    uid: int | None = None
    unit: str | None = None
    scope: Literal["process", "application"] = "process"
    download: int = 0
    upload: int = 0
    permanent: bool = False
    enabled: bool = True

    # --- keys one by one ----------------------------------------------------------------------
    @field_validator("id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and not ID_RE.match(v):
            raise ValueError(f"must be 1 to {ID_MAX} characters of a-z 0-9 _ . - starting with "
                             f"a letter or digit, not {v!r}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        _no_control(v)
        if len(v) > NAME_MAX:
            raise ValueError(f"is longer than {NAME_MAX} characters")
        return v

    @field_validator("exe")
    @classmethod
    def _exe(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                glob.check(v)
            except glob.PatternError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("comm")
    @classmethod
    def _comm(cls, v: str | None) -> str | None:
        if v is None:
            return v
        _not_empty(v)
        _no_control(v)
        raw = v.encode("utf-8", "surrogateescape")
        if len(raw) > COMM_MAX_BYTES:
            cut = raw[:COMM_MAX_BYTES].decode("utf-8", "ignore")
            raise ValueError(f"is longer than {COMM_MAX_BYTES} bytes, the kernel's limit for a "
                             f"process name: it is truncated to {cut!r}, so write that")
        return v

    @field_validator("cmdline")
    @classmethod
    def _cmdline(cls, v: str | None) -> str | None:
        if v is None:
            return v
        _not_empty(v)
        if len(v) > CMDLINE_MAX:
            raise ValueError(f"is longer than {CMDLINE_MAX} characters")
        try:
            compile_cmdline(v)
        except re.error as e:
            raise ValueError(f"is not a valid regular expression: {e}") from None
        return v

    @field_validator("uid")
    @classmethod
    def _uid(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= UID_MAX:
            raise ValueError(f"must be a user id between 0 and {UID_MAX}, not {v}")
        return v

    @field_validator("unit")
    @classmethod
    def _unit(cls, v: str | None) -> str | None:
        if v is None:
            return v
        _not_empty(v)
        _no_control(v)
        if len(v) > UNIT_MAX:
            raise ValueError(f"is longer than {UNIT_MAX} characters")
        if is_unit_path(v):
            parts = unit_parts(v)
            if not parts:
                raise ValueError("'/' is every process of the machine: give a unit or a "
                                 "cgroup below the cgroup2 root")
            if any(p in (".", "..") for p in parts):
                raise ValueError(f"must not contain '.' or '..' components ({v!r})")
        elif v in (".", "..") or not _UNIT_NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a systemd unit name (letters, digits and "
                             f":_.\\@- only, e.g. backup.service) nor a cgroup path "
                             f"(/system.slice/backup.service)")
        return v

    @field_validator("download", "upload")
    @classmethod
    def _rate(cls, v: int) -> int:
        return check_rate(v)

    # --- the rule as a whole ------------------------------------------------------------------
    @model_validator(mode="after")
    def _whole(self) -> Rule:
        if all(getattr(self, k) is None for k in MATCH_KEYS):
            raise PydanticCustomError(
                "rule_keys", "{text}",
                {"text": "at least one match key is needed: exe, comm, cmdline, uid or unit",
                 "key": "exe, comm, cmdline, uid, unit"})
        if not self.download and not self.upload:
            raise PydanticCustomError(
                "rule_keys", "{text}",
                {"text": "download and upload are both 0 (or missing): a rule must limit at "
                         "least one direction", "key": "download, upload"})
        return self

    # --- properties ---------------------------------------------------------------------------
    @property
    def match_keys(self) -> tuple[str, ...]:
        return tuple(k for k in MATCH_KEYS if getattr(self, k) is not None)

    @property
    def exe_is_glob(self) -> bool:
        return self.exe is not None and glob.is_glob(self.exe)

    def with_id(self, rule_id: str) -> Rule:
        return Rule.model_validate({**self.model_dump(), "id": rule_id})

    # --- conversions --------------------------------------------------------------------------
    @classmethod
    def from_bus(cls, data: Mapping[str, Any]) -> Rule:
        """A rule from the bus: a plain dict of the a{sv} values (the bus layer unwraps the
        Variants).  ``id`` may be given; ``matched`` (ListRules output) is not a rule key."""
        return _validate(dict(data), source=None)

    def to_bus(self) -> dict[str, Any]:
        """Plain dict for the bus (the bus layer wraps each value in a Variant of the type in
        ``names.RULE_KEY_SIGNATURES``): every key with a value, ``id`` when set."""
        out: dict[str, Any] = {}
        if self.id is not None:
            out["id"] = self.id
        for key in RULE_KEYS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_file(cls, data: Mapping[str, Any], rule_id: str, source: str) -> Rule:
        """A permanent rule from the parsed TOML of ``source`` (named ``<rule_id>.toml``)."""
        for key in ("id", "permanent"):
            if key in data:
                why = ("the file name is the id" if key == "id"
                       else "a file is a permanent rule")
                raise InvalidRule(f"{source}: key {key!r}: not allowed in a rule file ({why})",
                                  key=key, source=source)
        return _validate({**data, "id": rule_id, "permanent": True}, source=source)

    @classmethod
    def from_toml(cls, text: str, rule_id: str, source: str) -> Rule:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            key = _key_at_error(text, str(e))
            where = f"key {key!r}: " if key else ""
            raise InvalidRule(f"{source}: {where}not valid TOML: {e}", key=key,
                              source=source) from None
        return cls.from_file(data, rule_id, source)

    def to_file_dict(self) -> dict[str, Any]:
        """The keys of a rule file: no ``id`` (the file name) and no ``permanent``."""
        out = {k: v for k, v in self.to_bus().items() if k not in ("id", "permanent")}
        if not out.get("name"):
            out.pop("name", None)
        return out

    def to_toml(self) -> str:
        return FILE_HEADER + tomli_w.dumps(self.to_file_dict())


# --- errors -----------------------------------------------------------------------------------
_TYPE_TEXT = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "bool_type": "must be true or false (a boolean)",
    "bool_parsing": "must be true or false (a boolean)",
    "string_type": "must be a string",
    "literal_error": f"must be {names.SCOPE_PROCESS!r} or {names.SCOPE_APPLICATION!r}",
}


def _error_text(err: Mapping[str, Any]) -> tuple[str | None, str]:
    """(key, sentence naming the key) for one pydantic error."""
    loc = err.get("loc") or ()
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    if kind == "rule_keys":
        return ctx.get("key"), str(ctx.get("text"))
    key = str(loc[0]) if loc else None
    if kind == "extra_forbidden":
        return key, (f"unknown key {key!r} (the keys are: {', '.join(RULE_KEYS)})")
    text = errortext.sentence(err, _TYPE_TEXT)
    return key, (f"key {key!r}: {text}" if key else text)


def _validate(data: dict[str, Any], source: str | None) -> Rule:
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise InvalidRule(f"{source + ': ' if source else ''}keys must be strings, not "
                          f"{bad[0]!r}", source=source)
    try:
        return Rule.model_validate(data)
    except ValidationError as e:
        found = [_error_text(err) for err in e.errors()]
        key = found[0][0]
        text = "; ".join(t for _, t in found)
        if source:
            text = f"{source}: {text}"
        raise InvalidRule(text, key=key, source=source) from None


_AT_LINE = re.compile(r"\(at line (\d+), column \d+\)")
_KEY_LINE = re.compile(r"\s*([A-Za-z0-9_-]+)\s*=")


def _key_at_error(text: str, message: str) -> str | None:
    """The key on the line a TOML error points at, when that line is ``key = ...``."""
    m = _AT_LINE.search(message)
    if not m:
        return None
    lines = text.splitlines()
    n = int(m.group(1)) - 1
    if not 0 <= n < len(lines):
        return None
    k = _KEY_LINE.match(lines[n])
    return k.group(1) if k else None


# --- ids --------------------------------------------------------------------------------------
def slug(text: str) -> str:
    """A safe id stem from free text ('' when nothing usable is left)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    s = re.sub(r"[^a-z0-9_.-]+", "-", ascii_text.lower())
    s = re.sub(r"^[^a-z0-9]+", "", s)[:ID_MAX]
    return s.rstrip("-.")


def _base_id(rule: Rule) -> str:
    candidates = [rule.name]
    if rule.exe is not None:
        literal = [p for p in glob.components(rule.exe) if not glob.is_glob(p)]
        candidates.append(literal[-1] if literal else "")
    candidates += [rule.comm or "", (unit_parts(rule.unit)[-1] if rule.unit else "")]
    if rule.uid is not None:
        candidates.append(f"uid-{rule.uid}")
    if rule.cmdline is not None:
        candidates.append("cmdline")
    for c in candidates:
        s = slug(c)
        if s:
            return s
    return "rule"


def make_id(rule: Rule, taken: Collection[str] = ()) -> str:
    """A new id for ``rule`` (from its name, else its match keys), not in ``taken``."""
    base = _base_id(rule)
    if base not in taken:
        return base
    n = 2
    while True:
        suffix = f"-{n}"
        candidate = base[:ID_MAX - len(suffix)].rstrip("-.") + suffix
        if candidate not in taken:
            return candidate
        n += 1


# --- precedence -------------------------------------------------------------------------------
def precedence_key(rule: Rule) -> tuple[int, int, int, str]:
    """Sort key: the first rule in this order wins (see the module docstring)."""
    if rule.exe is None:
        exe_rank, literal = 2, 0
    elif rule.exe_is_glob:
        exe_rank, literal = 1, glob.literal_chars(rule.exe)
    else:
        exe_rank, literal = 0, 0
    return (-len(rule.match_keys), exe_rank, -literal, rule.id or "")
