"""The socket check's turns (issue 11, scale): each pass takes the next few idle budgets in
turn instead of sorting every budget; the turns are rebuilt, least recently checked first,
only when the roots change.  Pure logic: the budgets are a dict and a generation."""

from types import SimpleNamespace

from chadthrottle import sampler as sampler_mod
from chadthrottle.sampler import Sampler


def make(roots: dict[int, int]) -> tuple[Sampler, SimpleNamespace]:
    budgets = SimpleNamespace(by_root=dict(roots), roots_gen=0)
    return Sampler(kernel=None, budgets=budgets), budgets


def test_every_idle_budget_gets_its_turn_and_active_ones_are_skipped(monkeypatch):
    monkeypatch.setattr(sampler_mod, "CHECKS_PER_PASS", 3)
    s, _ = make({100 + i: i for i in range(8)})
    seen = []
    for _ in range(4):
        seen += s._next_idle(active={2, 5})
    assert len(seen) == 12
    assert {bid for _, bid in seen[:6]} == {0, 1, 3, 4, 6, 7}  # one round: each idle once
    assert all(bid not in (2, 5) for _, bid in seen)
    assert seen[6:12] == seen[:6]  # then the same order again


def test_turns_are_rebuilt_when_roots_change_least_recently_checked_first(monkeypatch):
    monkeypatch.setattr(sampler_mod, "CHECKS_PER_PASS", 2)
    s, budgets = make({100: 0, 101: 1, 102: 2})
    s._socket = {0: (50.0, 0, 0), 1: (10.0, 0, 0), 2: (30.0, 0, 0)}
    assert s._next_idle(set()) == [(101, 1), (102, 2)]
    budgets.by_root.pop(101)
    budgets.by_root[103] = 3  # never checked: first
    budgets.roots_gen += 1
    assert s._next_idle(set()) == [(103, 3), (102, 2)]
    assert s._next_idle(set()) == [(100, 0), (103, 3)]


def test_a_root_gone_without_a_new_generation_is_skipped(monkeypatch):
    monkeypatch.setattr(sampler_mod, "CHECKS_PER_PASS", 5)
    s, budgets = make({100: 0, 101: 1})
    s._next_idle(set())
    del budgets.by_root[100]
    assert s._next_idle(set()) == [(101, 1)]
    assert s._next_idle(set()) == [(101, 1)]
