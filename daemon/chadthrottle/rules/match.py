"""The user-space matcher: which rule limits a process, and what of a rule the kernel can
decide by itself.

The kernel decides most execs (executable inode, uid, comm, cgroup).  User space matches
the running processes when a rule is added or the daemon starts, and decides what the
kernel cannot: ``cmdline`` rules and ``exe`` globs (a file that matches a glob may appear
after the rule was loaded).

Matching, key by key (all the keys a rule gives must hold):

* ``exe``: the pattern (:mod:`chadthrottle.rules.glob`) against the process's executable path
  as the kernel reports it.  A process still running a file that a package upgrade replaced
  reports ``/usr/bin/x (deleted)``; the readers strip that suffix, so a rule on the path
  still matches it.  With ``inodes`` (rule id -> the ``(st_dev, st_ino)`` of
  :func:`kernel_keys`), the process's executable file also matches when it is one of those
  files: the kernel's own test, which makes a rule on a symbolic link (``/bin/sleep`` on a
  merged-/usr system, ``/usr/bin/python3``) match as in the kernel.
* ``comm``: equal to the process name.
* ``cmdline``: the regular expression is searched (``re.search``) in the arguments joined by
  single spaces.
* ``uid``: equal to the real uid.
* ``unit``: a unit name matches a cgroup path that has a component equal to it (the unit's
  cgroup and everything below it); a path (``/system.slice/backup.service``) matches that
  cgroup and the cgroups below it, on component boundaries (not ``backup.service2``).

Never matched: pid 1, the pids in ``exempt`` (the daemon's own), and kernel threads (the
readers never produce facts for them).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from . import glob
from .model import Rule, compile_cmdline, is_unit_path, precedence_key, unit_parts
from .ruleset import RuleSet

INIT_PID = 1
MAX_FILES = 100_000

FileId = tuple[int, int]  # (st_dev, st_ino)


@dataclass(frozen=True)
class ProcessFacts:
    """What the matcher knows of one process (read by :mod:`chadthrottle.rules.procinfo`)."""

    pid: int
    start_time: int  # clock ticks after boot, /proc/PID/stat field 22
    exe: str  # the executable's path, " (deleted)" stripped
    comm: str
    cmdline: str  # the arguments joined by single spaces
    uid: int  # real uid
    cgroup: str  # cgroup2 path, "/user.slice/…" ("" when the process has none)
    exe_id: FileId | None = None  # (st_dev, st_ino) of the executable file


# --- one rule, one process --------------------------------------------------------------------
def unit_matches(unit: str, cgroup: str) -> bool:
    """Is a process in cgroup ``cgroup`` in (or below) ``unit``?"""
    have = unit_parts(cgroup)
    if is_unit_path(unit):
        want = unit_parts(unit)
        return have[:len(want)] == want
    return unit in have


def exe_matches(rule: Rule, facts: ProcessFacts,
                inodes: Mapping[str, frozenset[FileId]] | None = None) -> bool:
    assert rule.exe is not None
    if facts.exe and glob.matches(rule.exe, facts.exe):
        return True
    if inodes is not None and facts.exe_id is not None and rule.id is not None:
        return facts.exe_id in inodes.get(rule.id, frozenset())
    return False


def matches(rule: Rule, facts: ProcessFacts,
            inodes: Mapping[str, frozenset[FileId]] | None = None) -> bool:
    """Do all the match keys of ``rule`` hold for ``facts``?  (``enabled`` is not looked at.)"""
    if rule.uid is not None and facts.uid != rule.uid:
        return False
    if rule.comm is not None and facts.comm != rule.comm:
        return False
    if rule.unit is not None and not unit_matches(rule.unit, facts.cgroup):
        return False
    if rule.exe is not None and not exe_matches(rule, facts, inodes):
        return False
    return rule.cmdline is None or compile_cmdline(rule.cmdline).search(facts.cmdline) is not None


def best_rule(facts: ProcessFacts, rules: Iterable[Rule], *,
              inodes: Mapping[str, frozenset[FileId]] | None = None,
              exempt: frozenset[int] | set[int] = frozenset()) -> Rule | None:
    """The enabled rule that limits this process by the precedence, or None."""
    if facts.pid <= INIT_PID or facts.pid in exempt:
        return None
    ordered = rules.ordered() if isinstance(rules, RuleSet) else \
        sorted((r for r in rules if r.enabled), key=precedence_key)
    for rule in ordered:
        if matches(rule, facts, inodes):
            return rule
    return None


def match_all(processes: Iterable[ProcessFacts], rules: Iterable[Rule], *,
              inodes: Mapping[str, frozenset[FileId]] | None = None,
              exempt: frozenset[int] | set[int] = frozenset()) -> dict[int, Rule]:
    """pid -> the rule that limits it, for every process some rule matches."""
    ruleset = rules if isinstance(rules, RuleSet) else None
    ordered = ruleset.ordered() if ruleset is not None else \
        tuple(sorted((r for r in rules if r.enabled), key=precedence_key))
    out: dict[int, Rule] = {}
    for facts in processes:
        rule = best_rule(facts, ordered, inodes=inodes, exempt=exempt)
        if rule is not None:
            out[facts.pid] = rule
    return out


# --- what the kernel can decide ---------------------------------------------------------------
@dataclass(frozen=True)
class KernelKeys:
    """What of one rule the kernel can test at exec.

    Each key that is not None (or, for the sets, that the rule has) must hold.  ``exe_files``
    are the files matching ``exe`` now (follow symbolic links: the kernel sees the target);
    ``cgroup_ids`` the ids (cgroup2 directory inode numbers) of the cgroups ``unit`` names
    now — a process matches when its cgroup or an ancestor is one of them.  ``watch_dirs``
    are the directories whose changes (a file created, renamed over, removed; a directory
    created) can change ``exe_files``: a package upgrade that replaces a binary is noticed
    there and :func:`kernel_keys` is computed again.  ``cgroup_dirs`` are the cgroup2
    directories whose changes can change ``cgroup_ids``: the parents of the unit's cgroups
    (systemd removes a unit's cgroup when it stops and makes a new one, with a new id, when
    it starts again), or, for a cgroup path that does not exist yet, its nearest existing
    ancestor.  ``needs_user_space`` says the kernel's answer is not the whole answer
    (``reasons`` say why): user space must decide the execs it reports for this rule.
    """

    rule_id: str | None
    uid: int | None = None
    comm: str | None = None
    has_exe: bool = False
    exe_files: frozenset[FileId] = frozenset()
    has_unit: bool = False
    cgroup_ids: frozenset[int] = frozenset()
    watch_dirs: frozenset[str] = frozenset()
    cgroup_dirs: frozenset[str] = frozenset()
    needs_user_space: bool = False
    reasons: tuple[str, ...] = ()


def _file_id(path: str) -> FileId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def _nearest_existing_dir(path: str) -> str:
    while path != "/" and not _is_dir(path):
        path = os.path.dirname(path)
    return path


def _entries(directory: str) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []


def exe_files(pattern: str, max_files: int = MAX_FILES) -> tuple[frozenset[FileId],
                                                                   frozenset[str], bool]:
    """(ids of the regular files matching ``pattern`` now, directories to watch, complete).

    ``complete`` is False when more than ``max_files`` entries had to be looked at (a
    ``**`` over a large tree): then the kernel's set is partial."""
    if not glob.is_glob(pattern):
        parent = os.path.dirname(pattern)
        dirs = {_nearest_existing_dir(parent)}
        real = os.path.realpath(pattern)
        if real != pattern:  # a symbolic link: its target is replaced on upgrades
            dirs.add(_nearest_existing_dir(os.path.dirname(real)))
        fid = _file_id(pattern)
        return (frozenset([fid]) if fid else frozenset()), frozenset(dirs), True

    regex = glob.compile_pattern(pattern)
    parts = glob.components(pattern)
    files: set[FileId] = set()
    dirs: set[str] = set()
    budget = [max_files]

    def walk(directory: str, rest: list[str]) -> None:
        """Expand ``rest`` (pattern components) below ``directory`` (which exists)."""
        dirs.add(directory)
        part, tail = rest[0], rest[1:]
        if part == glob.DOUBLE_STAR:
            # every directory below; test each file's full path against the whole pattern
            for entry in _entries(directory):
                budget[0] -= 1
                if budget[0] < 0:
                    return
                path = os.path.join(directory, entry.name)
                if entry.is_dir(follow_symlinks=False):  # no loops through links
                    walk(path, rest)
                elif regex.match(path):
                    fid = _file_id(path)
                    if fid:
                        files.add(fid)
            return
        if not glob.is_glob(part):
            path = os.path.join(directory, part)
            if tail:
                if _is_dir(path):
                    walk(path, tail)
            else:
                fid = _file_id(path)
                if fid and regex.match(path):
                    files.add(fid)
            return
        component = glob.compile_pattern("/" + part)
        for entry in _entries(directory):
            budget[0] -= 1
            if budget[0] < 0:
                return
            if not component.match("/" + entry.name):
                continue
            path = os.path.join(directory, entry.name)
            if tail:
                if entry.is_dir():
                    walk(path, tail)
            else:
                fid = _file_id(path)
                if fid:
                    files.add(fid)

    start = glob.literal_dir(pattern)
    skip = len(glob.components(start)) if start != "/" else 0
    if _is_dir(start):
        walk(start, parts[skip:])
    else:
        dirs.add(_nearest_existing_dir(start))
    return frozenset(files), frozenset(dirs), budget[0] >= 0


def unit_cgroups(unit: str, cgroup_root: str) -> dict[int, str]:
    """id -> path of the cgroups ``unit`` names now below the cgroup2 mount ``cgroup_root``."""
    if is_unit_path(unit):
        path = os.path.join(cgroup_root, *unit_parts(unit))
        try:
            st = os.stat(path)
        except OSError:
            return {}
        return {st.st_ino: path} if stat.S_ISDIR(st.st_mode) else {}
    found: dict[int, str] = {}
    for directory, subdirs, _ in os.walk(cgroup_root):
        for name in subdirs:
            if name == unit:
                path = os.path.join(directory, name)
                try:
                    found[os.stat(path).st_ino] = path
                except OSError:
                    continue
    return found


def unit_cgroup_ids(unit: str, cgroup_root: str) -> frozenset[int]:
    """Ids of the cgroups ``unit`` names now below the cgroup2 mount ``cgroup_root``."""
    return frozenset(unit_cgroups(unit, cgroup_root))


def unit_cgroup_dirs(unit: str, cgroup_root: str, found: Mapping[int, str]) -> frozenset[str]:
    """The cgroup2 directories where a change can change what ``unit`` names (see
    :class:`KernelKeys`).  A unit name that names no cgroup yet may appear anywhere: none
    (user space decides its execs until it appears)."""
    if found:
        return frozenset(os.path.dirname(p) for p in found.values())
    if is_unit_path(unit):
        parent = os.path.dirname(os.path.join(cgroup_root, *unit_parts(unit)))
        return frozenset([_nearest_existing_dir(parent)])
    return frozenset()


def kernel_keys(rule: Rule, *, cgroup_root: str | None = None,
                max_files: int = MAX_FILES) -> KernelKeys:
    """What of ``rule`` the kernel can decide at exec, as of now (reads the file system and
    the cgroup tree; changes nothing)."""
    reasons: list[str] = []
    files: frozenset[FileId] = frozenset()
    dirs: frozenset[str] = frozenset()
    if rule.exe is not None:
        files, dirs, complete = exe_files(rule.exe, max_files)
        if rule.exe_is_glob:
            reasons.append("exe is a glob: files created later are matched in user space")
        if not complete:
            reasons.append(f"exe matches more than {max_files} entries: the kernel's set is "
                           f"partial")
    ids: frozenset[int] = frozenset()
    cgroup_dirs: frozenset[str] = frozenset()
    if rule.unit is not None:
        if cgroup_root is None:
            reasons.append("unit: no cgroup2 mount given")
        else:
            found = unit_cgroups(rule.unit, cgroup_root)
            ids = frozenset(found)
            cgroup_dirs = unit_cgroup_dirs(rule.unit, cgroup_root, found)
            if not ids:
                reasons.append("unit: no such cgroup yet")
    if rule.cmdline is not None:
        reasons.append("cmdline is decided in user space")
    return KernelKeys(
        rule_id=rule.id, uid=rule.uid, comm=rule.comm,
        has_exe=rule.exe is not None, exe_files=files,
        has_unit=rule.unit is not None, cgroup_ids=ids,
        watch_dirs=dirs, cgroup_dirs=cgroup_dirs, needs_user_space=bool(reasons),
        reasons=tuple(reasons),
    )


def user_space_rules(rules: Iterable[Rule]) -> tuple[Rule, ...]:
    """The enabled rules the kernel cannot decide alone by their keys (cmdline, exe glob)."""
    return tuple(r for r in rules if r.enabled and (r.cmdline is not None or r.exe_is_glob))


def watch_dirs(keys: Iterable[KernelKeys]) -> frozenset[str]:
    """Every directory to watch for the exe rules behind ``keys``."""
    out: set[str] = set()
    for k in keys:
        out |= k.watch_dirs
    return frozenset(out)
