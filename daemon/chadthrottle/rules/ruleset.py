"""An immutable set of rules keyed by id.

Every change returns a new set, so the daemon builds the next set completely (a reload that
fails leaves nothing half applied) and swaps it in with one assignment.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from ..errors import InvalidRule, NoSuchRule
from .model import Rule, make_id, precedence_key


class RuleSet(Mapping[str, Rule]):
    """id -> Rule; iteration is in id order, :meth:`ordered` in precedence order."""

    __slots__ = ("_rules", "_ordered")

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        found: dict[str, Rule] = {}
        for rule in rules:
            if rule.id is None:
                raise InvalidRule("key 'id': a rule in a set needs an id", key="id")
            if rule.id in found:
                raise InvalidRule(f"key 'id': {rule.id!r} is given twice", key="id")
            found[rule.id] = rule
        self._rules = dict(sorted(found.items()))
        self._ordered: tuple[Rule, ...] | None = None

    # --- Mapping ------------------------------------------------------------------------------
    def __getitem__(self, rule_id: str) -> Rule:
        return self._rules[rule_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._rules)

    def __len__(self) -> int:
        return len(self._rules)

    def __repr__(self) -> str:
        return f"RuleSet({list(self._rules)})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RuleSet):
            return self._rules == other._rules
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    # --- queries ------------------------------------------------------------------------------
    def rule(self, rule_id: str) -> Rule:
        """The rule with this id, or NoSuchRule."""
        try:
            return self._rules[rule_id]
        except KeyError:
            raise NoSuchRule(f"no rule with id {rule_id!r}") from None

    def ordered(self) -> tuple[Rule, ...]:
        """Enabled rules, in precedence order (the first that matches a process wins)."""
        if self._ordered is None:
            self._ordered = tuple(sorted((r for r in self._rules.values() if r.enabled),
                                         key=precedence_key))
        return self._ordered

    def permanent(self) -> tuple[Rule, ...]:
        return tuple(r for r in self._rules.values() if r.permanent)

    def runtime(self) -> tuple[Rule, ...]:
        return tuple(r for r in self._rules.values() if not r.permanent)

    # --- changes (each returns a new set) -------------------------------------------------------
    def assign_id(self, rule: Rule) -> Rule:
        """``rule`` itself when it has an id, else a copy with a new id unique in this set."""
        if rule.id is not None:
            return rule
        return rule.with_id(make_id(rule, self._rules.keys()))

    def put(self, rule: Rule) -> RuleSet:
        """Add ``rule``, or replace the rule with its id (how a rule's rate is changed)."""
        rule = self.assign_id(rule)
        return RuleSet([*(r for r in self._rules.values() if r.id != rule.id), rule])

    def remove(self, rule_id: str) -> RuleSet:
        self.rule(rule_id)
        return RuleSet(r for r in self._rules.values() if r.id != rule_id)

    def with_permanent(self, rules: Iterable[Rule]) -> RuleSet:
        """The runtime rules of this set with ``rules`` as the permanent ones (a reload).  A file
        whose id is a runtime rule's is refused: nothing changes."""
        runtime = {r.id: r for r in self.runtime()}
        new = list(rules)
        for rule in new:
            if not rule.permanent:
                raise InvalidRule(f"key 'permanent': rule {rule.id!r} is not permanent",
                                  key="permanent")
            if rule.id in runtime:
                source = f"{rule.id}.toml"
                raise InvalidRule(
                    f"{source}: the id {rule.id!r} is taken by a runtime rule; rename the file "
                    f"or remove the runtime rule ('chadthrottlectl rule remove {rule.id}')",
                    key="id", source=source)
        return RuleSet([*runtime.values(), *new])
