"""What the calling user may do, from GetPermissions (plain Python, no GTK).

GetPermissions answers, per polkit action, ``yes``, ``auth`` (a password will be asked) or
``no``.  A daemon without GetPermissions gives None: then nothing is disabled and the
daemon decides at the call, as it always does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from chadthrottle.gui import text
from chadthrottle.gui.model import Proc

YES, AUTH, NO = "yes", "auth", "no"
_RANK = {YES: 2, AUTH: 1, NO: 0}


def answer(permissions: Mapping[str, str] | None, action: str) -> str:
    if permissions is None:
        return YES
    value = permissions.get(action, NO)
    return value if value in _RANK else NO


def best(answers: Iterable[str]) -> str:
    """The most permissive of several ways to do something (no ways: no)."""
    return max(answers, key=lambda a: _RANK[a], default=NO)


def process_action(proc: Proc, my_uid: int) -> str:
    """The polkit action that SetLimit on this process needs (root needs none)."""
    if my_uid == 0 or proc.uid == my_uid:
        return text.ACTION_LIMIT_OWN
    return text.ACTION_LIMIT_ANY


def process_access(permissions, proc: Proc, my_uid: int) -> tuple[str, str]:
    """(answer, tooltip) for limiting one process."""
    action = process_action(proc, my_uid)
    a = answer(permissions, action)
    return a, text.permission_reason(action, a)


def rules_access(permissions, rules_supported: bool | None) -> tuple[str, str]:
    """(answer, tooltip) for AddRule / RemoveRule."""
    if rules_supported is False:
        return NO, "This daemon has no rules yet (it does not know AddRule)"
    a = answer(permissions, text.ACTION_MANAGE_RULES)
    return a, text.permission_reason(text.ACTION_MANAGE_RULES, a)


def unit_access(permissions) -> tuple[str, str]:
    a = answer(permissions, text.ACTION_LIMIT_ANY)
    return a, text.permission_reason(text.ACTION_LIMIT_ANY, a)
