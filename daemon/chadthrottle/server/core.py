"""What the bus layer calls: the engine's operations, with what the daemon adds around
them — rules, and the runtime state that survives a restart.

The bus layer translates and decides nothing; the engine is mechanism and knows no files.
This class is where a change becomes durable (written to the state dir before the reply
goes out) and where the rules meet the engine (through the RuleBook).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .. import names, procfs
from ..engine import (
    NOTICE_EXEC,
    NOTICE_EXITED,
    NOTICE_FULL,
    NOTICE_MOVED,
    NOTICE_RULE,
    ORIGIN_EXPLICIT,
    ORIGIN_RULE,
    Engine,
    Limit,
)
from ..errors import ChadthrottleError, NoSuchProcess
from ..ratelimit import RateLimiter, log_limited
from ..rules.model import Rule
from ..safetext import printable as safe
from ..state import StateDir, StoredHeir, StoredLimit, StoredUnitLimit, restorable
from .rulebook import RuleBook

log = logging.getLogger("chadthrottle.server")
F = names.JOURNAL_FIELD_PREFIX
ORIGIN_SETLIMIT = "SetLimit"
ORIGIN_SETUNITLIMIT = "SetUnitLimit"


class Core:
    def __init__(self, engine: Engine, paths, *, on_rules_changed=lambda: None) -> None:
        self.engine = engine
        self.state = StateDir(paths.state_dir)
        self.rules = RuleBook(engine, paths.rules_dir, on_change=on_rules_changed)

    # ---- start: everything back before the bus name is taken ----------------------------
    def restore(self) -> dict[str, int]:
        """Limits set with SetLimit and SetUnitLimit, and the runtime rules, as the last run
        left them; a process is limited again only if it is the very same (start time)."""
        t0 = time.monotonic()
        loaded = self.state.load()
        for problem in loaded.problems:
            log.warning("state: %s", problem)
        keep, drop = restorable(loaded.state.limits)
        for lim, why in drop:
            log.info("limit of PID %d not restored: %s", lim.pid, why)
            self.state.drop_limit(lim.pid)
        restored = 0
        for lim in keep:
            try:
                self.engine.set_limit(lim.pid, lim.download, lim.upload,
                                      start_time=lim.start_time, owner_uid=lim.uid)
                restored += 1
            except ChadthrottleError as e:
                log.info("limit of PID %d not restored: %s", lim.pid, e)
                self.state.drop_limit(lim.pid)
        units = 0
        for u in loaded.state.unit_limits:
            try:
                self.engine.set_unit_limit(u.unit, u.download, u.upload)
                units += 1
            except ChadthrottleError as e:
                log.info("limit of %s not restored: %s", u.unit, e)
                self.state.drop_unit(u.unit)
        self.rules.start(loaded.state.rules)
        heirs = self._restore_heirs(loaded.state.heirs)
        counts = {"limits": restored, "unit_limits": units, "rules": len(self.rules.rules),
                  "heirs": heirs, "ms": round((time.monotonic() - t0) * 1000)}
        self.rules.take_changes()  # nobody listens before the name is taken
        log.info("state restored: %(limits)d limit(s), %(unit_limits)d unit limit(s), "
                 "%(rules)d rule(s), %(heirs)d process(es) carrying a rule's limit in "
                 "%(ms)d ms", counts)
        return counts

    def _restore_heirs(self, heirs) -> int:
        """Processes that carried a rule's limit after the process the rule matched exited:
        the rules (matched again above) may not match them by themselves."""
        keep, drop = restorable(heirs)
        for heir, why in drop:
            log.info("rule limit of PID %d not restored: %s", heir.pid, why)
            self.state.drop_heir(heir.pid)
        n = 0
        for heir in keep:
            if self.rules.restore_heir(heir.pid, heir.start_time, heir.rule):
                n += 1
            else:
                log.info("rule limit of PID %d not restored: rule %s does not limit it any "
                         "more", heir.pid, heir.rule)
                self.state.drop_heir(heir.pid)
        return n

    def _forget_heirs(self) -> None:
        """After a change of rules: heirs no longer limited by their rule are forgotten."""
        for heir in self.state.heirs():
            if self.rules.rule_of(heir.pid) != heir.rule:
                self.state.drop_heir(heir.pid)

    # ---- limits --------------------------------------------------------------------------
    def set_limit(self, pid: int, download: int, upload: int, *,
                  process: procfs.Process | None = None, owner_uid: int = 0) -> Limit | None:
        had = self._explicit(pid)
        by_rule = self.rules.rule_of(pid)
        lim = self.engine.set_limit(pid, download, upload, process=process, owner_uid=owner_uid)
        if lim is None:
            self.state.drop_limit(pid)
            if had:
                self.rules.match_tree(pid)
            self.rules.retry_denied()
        else:
            self.state.put_limit(StoredLimit(pid=lim.pid, start_time=lim.start_time,
                                             download=lim.download, upload=lim.upload,
                                             uid=owner_uid, origin=ORIGIN_SETLIMIT))
            if by_rule:
                self.rules.journal_explicit(by_rule, pid)
        return lim

    def clear_limit(self, pid: int) -> None:
        had = self._explicit(pid)
        self.engine.clear_limit(pid)
        self.state.drop_limit(pid)
        if had:
            self.rules.match_tree(pid)
        self.rules.retry_denied()

    def _explicit(self, pid: int) -> bool:
        """Does pid hold a limit set with SetLimit (which wins over rules while it lives)?"""
        lim = self.engine.limit_of(pid)
        return lim is not None and lim.origin == ORIGIN_EXPLICIT

    def set_unit_limit(self, unit: str, download: int, upload: int, *, owner_uid: int = 0):
        ul = self.engine.set_unit_limit(unit, download, upload)
        if ul is None:
            self.state.drop_unit(unit)
        else:
            self.state.put_unit(StoredUnitLimit(unit=ul.cgroup, download=download,
                                                upload=upload, uid=owner_uid,
                                                origin=ORIGIN_SETUNITLIMIT))
        return ul

    def clear_unit_limit(self, unit: str) -> None:
        self.engine.clear_unit_limit(unit)
        try:
            self.state.drop_unit(self.engine.cg.resolve(unit))
        except ChadthrottleError:
            self.state.drop_unit(unit)

    def limit_owner(self, pid: int) -> tuple[str, int] | None:
        """(origin, uid of who set it) of the limit on pid, for authorization."""
        lim = self.engine.limit_of(pid)
        return (lim.origin, lim.owner_uid) if lim is not None else None

    # ---- rules ---------------------------------------------------------------------------
    def add_rule(self, data: dict[str, Any]) -> str:
        rule = self.rules.add(Rule.from_bus(data))
        if not rule.permanent:
            self.state.put_rule(rule)
        else:
            self.state.drop_rule(rule.id)
        log.info("rule %s added (%s)", rule.id, "permanent" if rule.permanent else "runtime",
                 extra={"journal": {F + "RULE": rule.id, F + "KIND": "rule-add"}})
        self._forget_heirs()
        self.rules.retry_denied()
        return rule.id

    def remove_rule(self, rule_id: str) -> None:
        rule = self.rules.remove(rule_id)
        if not rule.permanent:
            self.state.drop_rule(rule_id)
        log.info("rule %s removed", rule_id,
                 extra={"journal": {F + "RULE": rule_id, F + "KIND": "rule-remove"}})
        self._forget_heirs()
        self.rules.retry_denied()

    def take_rule_changes(self) -> list[tuple[str, int]]:
        """(LIMITED or FREED, pid) of what rules did since the last call (for signals)."""
        return self.rules.take_changes()

    def list_rules(self) -> list[tuple[Rule, int]]:
        return self.rules.listing()

    def reload(self) -> None:
        self.rules.reload()
        self._forget_heirs()
        self.rules.retry_denied()

    # ---- what the kernel reported ----------------------------------------------------------
    def on_notices(self, notices) -> None:
        freed = False
        for n in notices:
            if n.kind == NOTICE_FULL:
                self._full(n)
            elif n.kind == NOTICE_EXITED:
                freed = True
                self.state.drop_limit(n.pid)
                if n.rule:
                    self.state.drop_heir(n.pid)
                    self.rules.journal_exit(n.rule, n.pid)
            elif n.kind == NOTICE_MOVED:
                self.state.drop_limit(n.pid)
                self.state.drop_heir(n.pid)
                lim = self.engine.limit_of(n.other)
                if lim is not None and lim.origin == ORIGIN_EXPLICIT:
                    self.state.put_limit(StoredLimit(
                        pid=lim.pid, start_time=lim.start_time, download=lim.download,
                        upload=lim.upload, uid=lim.owner_uid, origin=ORIGIN_SETLIMIT))
                elif lim is not None and lim.origin == ORIGIN_RULE and lim.rule:
                    # the heir may match no rule by itself: kept, so a restart limits it
                    self.state.put_heir(StoredHeir(pid=lim.pid, start_time=lim.start_time,
                                                   rule=lim.rule))
            elif n.kind == NOTICE_RULE:
                self.rules.started(n.rule, n.pid)
                lim = self.engine.limit_of(n.pid) if n.other else None
                if lim is not None and lim.rule:
                    # carries the limit of a matched launcher that is gone: kept, as an heir
                    self.state.put_heir(StoredHeir(pid=lim.pid, start_time=lim.start_time,
                                                   rule=lim.rule))
            elif n.kind == NOTICE_EXEC:
                try:
                    self.rules.on_exec(n.pid)
                except NoSuchProcess:
                    pass
        if freed:  # room for the processes rules matched while the kernel had none
            self.rules.retry_denied()

    _full_log = RateLimiter(burst=5, period=60.0)

    def _full(self, n) -> None:
        """A kernel map was full (which way each fails is chosen in the README, "Limits")."""
        if n.detail == "limits" and n.rule and n.pid:
            self.rules.no_room(n.pid, None, n.rule)  # limited by its rule when room comes
            return
        what = {
            "process storage": "could not join its limit (no kernel memory for its "
                               "membership): it runs unlimited",
            "paced connections": "has a connection whose sender on this host is not paced "
                                 "(its limit is held by the bucket alone)",
        }.get(n.detail, f"could not be limited ({n.detail} map full)")
        log_limited(log, self._full_log, n.detail, logging.WARNING, "the kernel's %s map is "
                    "full: PID %d (%s) %s", n.detail, n.pid, safe(procfs.comm(n.pid)), what,
                    )
