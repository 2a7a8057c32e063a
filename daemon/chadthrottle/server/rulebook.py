"""The rules in force, connected to the engine.

The rules part (:mod:`chadthrottle.rules`) says what a rule is, where it is kept and which
process it matches; the engine holds budgets and runs the exec matcher.  This module joins
them, and is the only place that does:

* the kernel's exec matcher gets the enabled rules in precedence order, with what of each
  the kernel can decide (executable inodes, uid, name, cgroup);
* running processes are matched when the rules change and when the daemon starts;
* the execs the kernel reports for user space (command lines, unknown files in a watched
  directory) are decided here;
* a change is applied as a difference: a rule whose rate changed keeps its budgets and gets
  the new rate (no gap); a rule removed or disabled frees its processes at once; nothing
  else moves.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .. import abi, cgroups, names, procfs
from ..budgets import burst_for
from ..engine import Engine, KernelRule
from ..errors import ChadthrottleError, InvalidLimit, NoSuchLimit, NoSuchProcess, Unsupported
from ..ratelimit import RateLimiter, log_limited
from ..rules import procinfo
from ..rules.match import KernelKeys, best_rule, kernel_keys, matches
from ..rules.model import Rule
from ..rules.ruleset import RuleSet
from ..rules.store import RuleFiles
from ..safetext import printable as safe
from ..shaping.pacing import mss_for

log = logging.getLogger("chadthrottle.rules")
F = names.JOURNAL_FIELD_PREFIX
LIMITED = "limited"  # a rule limits the process now, or its rule's rate changed
FREED = "freed"      # the rule that limited the process was removed, disabled or changed
#: processes a rule matched while the kernel had no room for another limit, kept to be
#: limited when room comes back (the oldest are forgotten past this many)
MAX_DENIED = 4096


@dataclass(frozen=True)
class _Applied:
    """What of a rule is in force (to tell a rate change from a change of what it matches)."""

    rule: Rule

    def same_match(self, other: Rule) -> bool:
        a, b = self.rule, other
        return (a.exe, a.comm, a.cmdline, a.uid, a.unit, a.scope) == \
               (b.exe, b.comm, b.cmdline, b.uid, b.unit, b.scope)


class RuleBook:
    def __init__(self, engine: Engine, rules_dir, *,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self._engine = engine
        self.files = RuleFiles(rules_dir)
        self.rules = RuleSet()
        self._applied: dict[str, _Applied] = {}
        self._keys: dict[str, KernelKeys] = {}
        self._app: dict[str, int] = {}  # rule id -> shared budget id (scope=application)
        self._on_change = on_change
        #: (LIMITED or FREED, pid) of limits rules set, changed or ended, not yet announced
        #: on the bus (the bus layer takes them: LimitChanged, LimitRemoved)
        self._changes: list[tuple[str, int]] = []
        #: pid -> (start time, rule id): matched, but no room for a limit (retry_denied)
        self.denied: OrderedDict[int, tuple[int, str]] = OrderedDict()
        self._no_room_log = RateLimiter(burst=5, period=60.0)

    # -- loading -------------------------------------------------------------------------
    def start(self, runtime: tuple[Rule, ...] = ()) -> None:
        """The rules at start: the runtime ones kept in the state dir and the files.  A
        broken file is logged (naming it and the key) and the daemon starts without the
        files' rules; `Reload` tries again."""
        rules = RuleSet(runtime)
        try:
            rules = rules.with_permanent(self.files.load())
        except ChadthrottleError as e:
            log.error("permanent rules not loaded: %s", e,
                      extra={"journal": {F + "KIND": "rules", F + "ERROR": safe(e)}})
        self._set(rules)

    def reload(self) -> None:
        """Re-read the permanent rules.  A broken file refuses the whole reload (InvalidRule
        naming the file and the key) and changes nothing."""
        try:
            rules = self.rules.with_permanent(self.files.load())
        except ChadthrottleError as e:
            log.error("reload refused: %s", e,
                      extra={"journal": {F + "KIND": "rules", F + "ERROR": safe(e)}})
            raise
        self._set(rules)
        log.info("rules reloaded: %d rule(s), %d permanent", len(rules),
                 len(rules.permanent()))

    # -- changes ---------------------------------------------------------------------------
    def add(self, rule: Rule) -> Rule:
        """Add a rule, or replace the rule with its id; a permanent one gets its file."""
        rule = self.rules.assign_id(rule)
        old = self.rules.get(rule.id)
        if rule.permanent:
            self.files.write(rule)
        elif old is not None and old.permanent:
            self.files.remove(rule.id)
        self._set(self.rules.put(rule))
        return rule

    def remove(self, rule_id: str) -> Rule:
        rule = self.rules.rule(rule_id)
        if rule.permanent:
            self.files.remove(rule_id)
        self._set(self.rules.remove(rule_id))
        return rule

    def listing(self) -> list[tuple[Rule, int]]:
        """Every rule with the number of processes it limits now."""
        counts: dict[str, int] = {}
        for b in self._engine.budgets.by_bid.values():
            if b.rule:
                lim = self._engine.budgets.read(b.bid)
                counts[b.rule] = counts.get(b.rule, 0) + (max(int(lim.members), 0) if lim else 0)
        return [(r, counts.get(r.id, 0)) for r in self.rules.values()]

    # -- applying --------------------------------------------------------------------------
    def _set(self, rules: RuleSet) -> None:
        old, self.rules = self.rules, rules
        del old
        self._apply()
        self._on_change()

    def _apply(self) -> None:
        eng = self._engine
        wanted = {r.id: r for r in self.rules.ordered()}
        for rid, applied in list(self._applied.items()):
            new = wanted.get(rid)
            if new is not None and new.scope == applied.rule.scope \
                    and not applied.same_match(new):
                # other keys (an edited file): what it still matches stays limited throughout
                self._narrow(rid, new)
                if (new.download, new.upload) != (applied.rule.download, applied.rule.upload):
                    eng.change_rule(rid, new.download, new.upload)
                    self._changes += [(LIMITED, pid) for b in eng.rule_budgets(rid)
                                      for pid in b.roots]
                self._applied[rid] = _Applied(new)
            elif new is None or not applied.same_match(new):
                freed = eng.drop_rule(rid)
                self._app.pop(rid, None)
                self._keys.pop(rid, None)
                del self._applied[rid]
                for pid in freed:
                    self._journal_stop(rid, pid, "the rule was removed or changed")
                    self._changes.append((FREED, pid))
            elif (new.download, new.upload) != (applied.rule.download, applied.rule.upload):
                eng.change_rule(rid, new.download, new.upload)
                self._applied[rid] = _Applied(new)
                self._changes += [(LIMITED, pid) for b in eng.rule_budgets(rid)
                                  for pid in b.roots]
                log.info("rule %s: rate changed to download=%d upload=%d B/s", rid,
                         new.download, new.upload, extra={"journal": {F + "RULE": rid}})
        for rid, rule in wanted.items():
            if rid not in self._applied:
                if rule.scope == "application":
                    self._app[rid] = eng.rule_budget(rid, rule.download, rule.upload).bid
                self._applied[rid] = _Applied(rule)
        if wanted:
            eng.attach_root()  # rules must see processes wherever they start
        self._load_kernel()
        self.rematch()

    def _narrow(self, rid: str, new: Rule) -> None:
        """Rule ``rid`` got other match keys: the processes it limits that the new keys
        still match keep their budget (no moment without a limit); the others are freed."""
        eng = self._engine
        root = str(eng.cg.root) if eng.cg else None
        inodes = {rid: kernel_keys(new, cgroup_root=root).exe_files}
        for b in eng.rule_budgets(rid):
            for pid, start in list(b.roots.items()):
                facts = procinfo.read_facts(pid)
                if facts is not None and facts.start_time == start \
                        and matches(new, facts, inodes):
                    continue
                try:
                    eng.clear_limit(pid)
                except NoSuchLimit:
                    continue
                self._journal_stop(rid, pid, "the rule was changed and does not match it now")
                self._changes.append((FREED, pid))

    def refresh_kernel(self) -> None:
        """A watched directory changed: give the exec matcher what is true now.  In an exe
        rule's directory, a replaced binary has a new inode.  In the parent of a unit
        rule's cgroup, the unit stopped (its cgroup is gone) or started again (a new
        cgroup, a new id): processes that started in the new cgroup before this ran (the
        kernel still knew the old id) are matched now."""
        before = {rid: k.cgroup_ids for rid, k in self._keys.items()}
        dirs = self.watch_dirs()
        self._load_kernel()
        if any(k.cgroup_ids - before.get(rid, frozenset())
               for rid, k in self._keys.items() if k.has_unit):
            self.rematch()
        if self.watch_dirs() != dirs:
            self._on_change()  # watch where the unit's cgroups are now

    def _load_kernel(self) -> None:
        """Give the exec matcher the rules with what the kernel can test now."""
        root = str(self._engine.cg.root) if self._engine.cg else None
        krules = []
        keys_now: dict[str, KernelKeys] = {}
        for rule in self.rules.ordered():
            keys = kernel_keys(rule, cgroup_root=root)
            keys_now[rule.id] = keys
            krules.append(self._kernel_rule(rule, keys))
        self._keys = keys_now
        self._engine.load_exec_rules(krules)

    def _kernel_rule(self, rule: Rule, keys: KernelKeys) -> KernelRule:
        unit = None
        user = rule.cmdline is not None
        if rule.unit is not None:
            if len(keys.cgroup_ids) == 1:
                cgid = next(iter(keys.cgroup_ids))
                rel = self._cgroup_of_id(cgid)
                level = cgroups.level(rel) + self._engine.kernel.cgroup_level \
                    if rel is not None else None
                unit = (level, cgid) if level is not None else None
            if unit is None:
                user = True  # no such cgroup yet, or several: user space decides
        dirs = set()
        for d in keys.watch_dirs:
            try:
                st = os.stat(d)
                dirs.add((st.st_dev, st.st_ino))
            except OSError:
                continue
        return KernelRule(
            rule_id=rule.id, download=rule.download, upload=rule.upload,
            burst_download=burst_for(rule.download), burst_upload=burst_for(rule.upload),
            mss=mss_for(rule.download, rule.upload),
            application=rule.scope == "application", app_budget=self._app.get(rule.id, 0),
            exe_files=keys.exe_files, exe_dirs=frozenset(dirs), has_exe=keys.has_exe,
            comm=rule.comm, uid=rule.uid, unit=unit, user_space=user)

    def _cgroup_of_id(self, cgid: int) -> str | None:
        root = self._engine.cg.root
        for dirpath, dirnames, _ in os.walk(root):
            for d in dirnames:
                p = os.path.join(dirpath, d)
                try:
                    if os.stat(p).st_ino == cgid:
                        return cgroups.norm(os.path.relpath(p, root))
                except OSError:
                    continue
        return None

    def watch_dirs(self) -> set[str]:
        """Directories whose changes call for :meth:`refresh_kernel`: those of exe rules
        and the cgroup2 parents of unit rules' cgroups."""
        out: set[str] = set()
        for k in self._keys.values():
            out |= k.watch_dirs | k.cgroup_dirs
        return out

    def _inodes(self) -> dict[str, frozenset]:
        return {rid: k.exe_files for rid, k in self._keys.items()}

    def rematch(self) -> None:
        """Match every running process against the rules (at start, after a change)."""
        if not self.rules.ordered():
            return
        inodes = self._inodes()
        exempt = {os.getpid()}
        for facts in procinfo.iter_facts():
            rule = best_rule(facts, self.rules, inodes=inodes, exempt=exempt)
            if rule is not None:
                self._limit(facts.pid, facts.start_time, rule)

    def on_exec(self, pid: int) -> None:
        """An exec the kernel could not decide alone."""
        self._match(pid, self._inodes())

    def match_tree(self, pid: int) -> None:
        """Match a process and its descendants again: an explicit limit on them ended, so
        the rules apply to them again (the explicit limit only won while it lived)."""
        if not self.rules.ordered():
            return
        inodes = self._inodes()
        for p in (pid, *procfs.descendants(pid)):
            self._match(p, inodes)

    def _match(self, pid: int, inodes: dict[str, frozenset]) -> None:
        facts = procinfo.read_facts(pid)
        if facts is None:
            return
        rule = best_rule(facts, self.rules, inodes=inodes, exempt={os.getpid()})
        if rule is not None:
            self._limit(pid, facts.start_time, rule)

    def restore_heir(self, pid: int, start_time: int, rule_id: str) -> bool:
        """At start: a process that carried rule ``rule_id``'s limit (it inherited it from a
        process that exited) gets it back, unless a rule matched it by itself (that one
        stays) or an explicit limit holds it.  True if the rule limits it now."""
        rule = self.rules.get(rule_id)
        if rule is None or not rule.enabled:
            return False
        if not self.rule_of(pid):
            self._limit(pid, start_time, rule)
        return self.rule_of(pid) == rule_id

    def rule_of(self, pid: int) -> str:
        """The id of the rule that limits process pid now ("" for none)."""
        try:
            with procfs.open_process(pid) as proc:
                current = self._engine.budgets.budget_of(proc)
        except NoSuchProcess:
            return ""
        b = self._engine.budgets.by_bid.get(current[0]) if current is not None else None
        return b.rule if b is not None else ""

    def _slot(self, rule_id: str) -> int:
        for i, r in enumerate(self.rules.ordered()[:abi.MAX_RULES]):
            if r.id == rule_id:
                return i + 1
        return 0

    def _limit(self, pid: int, start_time: int, rule: Rule) -> None:
        eng = self._engine
        try:
            with procfs.open_process(pid) as proc:
                if proc.start_time != start_time:
                    return
                current = eng.budgets.budget_of(proc)
                if current is not None:
                    b = eng.budgets.by_bid.get(current[0])
                    if current[1] & abi.TASK_EXPLICIT:
                        return  # an explicit SetLimit wins
                    if b is not None and b.rule == rule.id:
                        return  # already limited by this rule (or a child of such a process)
                budget = None
                if rule.scope == "application":
                    bid = self._app.get(rule.id)
                    budget = eng.budgets.by_bid.get(bid) if bid is not None else None
                    if budget is None:
                        return
                eng.rule_limit(proc, rule.id, rule.download, rule.upload, budget=budget,
                               slot=self._slot(rule.id))
        except (NoSuchProcess, InvalidLimit):
            return
        except Unsupported:  # no room for another limit in the kernel
            self.no_room(pid, start_time, rule.id)
            return
        self.denied.pop(pid, None)
        self.started(rule.id, pid)

    # -- no room for another limit -----------------------------------------------------------
    def no_room(self, pid: int, start_time: int | None, rule_id: str) -> None:
        """Rule ``rule_id`` matched ``pid`` but the kernel's limits map is full: the process
        runs unlimited (fail open: an exec cannot be held back) until a limit ends, then
        :meth:`retry_denied` limits it.  Said in the journal (rate-limited: a storm of
        matching processes is a storm of these)."""
        if start_time is None:
            try:
                start_time = procfs.start_time(pid)
            except NoSuchProcess:
                return
        self.denied[pid] = (start_time, rule_id)
        self.denied.move_to_end(pid)
        while len(self.denied) > MAX_DENIED:
            self.denied.popitem(last=False)
        log_limited(log, self._no_room_log, "no-room", logging.WARNING,
                    "no room for another limit (the kernel holds at most %d): rule %s "
                    "matched PID %d (%s), which runs unlimited until a limit ends",
                    self._engine.kernel.max_limits if self._engine.kernel else 0, rule_id,
                    pid, safe(procfs.comm(pid)))

    def retry_denied(self) -> int:
        """Limits ended: give the processes denied for want of room their rule's limit, as
        many as there is room for now.  Returns how many got one."""
        done = 0
        if not self.denied:
            return 0
        inodes = self._inodes()
        for pid, (start_time, _) in list(self.denied.items()):
            eng = self._engine
            if eng.kernel is None or len(eng.budgets) >= eng.kernel.max_limits:
                break
            del self.denied[pid]
            try:
                if procfs.start_time(pid) != start_time:
                    continue
            except NoSuchProcess:
                continue
            before = len(self._changes)
            self._match(pid, inodes)
            done += len(self._changes) > before
        return done

    def started(self, rule_id: str, pid: int) -> None:
        """Rule ``rule_id`` limits process pid now (by the daemon, or by the kernel at exec)."""
        self.journal_start(rule_id, pid)
        self._changes.append((LIMITED, pid))

    def take_changes(self) -> list[tuple[str, int]]:
        """The limits rules set, changed or ended since the last call, in order."""
        out, self._changes = self._changes, []
        return out

    # -- the journal -------------------------------------------------------------------------
    def journal_start(self, rule_id: str, pid: int) -> None:
        log.info("rule %s starts limiting PID %d (%s)", rule_id, pid, safe(procfs.comm(pid)),
                 extra={"journal": {F + "RULE": rule_id, F + "PID": str(pid),
                                    F + "KIND": "rule-start"}})

    def _journal_stop(self, rule_id: str, pid: int, why: str) -> None:
        log.info("rule %s stops limiting PID %d: %s", rule_id, pid, why,
                 extra={"journal": {F + "RULE": rule_id, F + "PID": str(pid),
                                    F + "KIND": "rule-stop"}})

    def journal_exit(self, rule_id: str, pid: int) -> None:
        self._journal_stop(rule_id, pid, "the process exited")

    def journal_explicit(self, rule_id: str, pid: int) -> None:
        self._journal_stop(rule_id, pid, "an explicit limit (SetLimit) wins")
