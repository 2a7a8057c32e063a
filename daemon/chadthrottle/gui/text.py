"""The applet's wording, in one place and in the CLI's terms (plain Python, no GTK).

Rates and limits are formatted by :mod:`chadthrottle.units`, the module behind
``chadthrottlectl``, so what the window shows can be typed back into the CLI.
"""

from __future__ import annotations

from chadthrottle import names
from chadthrottle.units import format_limit

START_HINT = "sudo systemctl start chadthrottled"
DEV_START_HINT = "sudo make run"

STATUS_LABEL = {
    names.STATUS_THROTTLED: "throttled",
    names.STATUS_NOT_WORKING: "not working",
    names.STATUS_PROGRAM_NOT_CALLED: "program not called",
    names.STATUS_NOT_DROPPING: "not dropping",
    names.STATUS_UNLIMITED: "unlimited",
}
STATUS_TOOLTIP = {
    names.STATUS_THROTTLED: "Limited; holding the limit",
    names.STATUS_NOT_WORKING: "NOT WORKING: the rate is above 1.5× the limit",
    names.STATUS_PROGRAM_NOT_CALLED: "The eBPF program is NOT BEING CALLED while traffic flows",
    names.STATUS_NOT_DROPPING: "Over the limit but NOT DROPPING packets",
    names.STATUS_UNLIMITED: "No limit set",
}
#: statuses that mean something is wrong (shown in the error colour)
BAD_STATUSES = frozenset({names.STATUS_NOT_WORKING, names.STATUS_PROGRAM_NOT_CALLED,
                          names.STATUS_NOT_DROPPING})
#: the most telling status of a group first (an application shows its worst process)
STATUS_ORDER = (names.STATUS_NOT_WORKING, names.STATUS_PROGRAM_NOT_CALLED,
                names.STATUS_NOT_DROPPING, names.STATUS_THROTTLED, names.STATUS_UNLIMITED)

# polkit actions the applet asks GetPermissions about (DESIGN §2, §2b)
ACTION_LIMIT_OWN = names.POLKIT_ACTION_LIMIT_OWN
ACTION_LIMIT_ANY = names.POLKIT_ACTION_LIMIT_ANY
ACTION_MANAGE_RULES = "org.chadthrottle.throttle.manage-rules"

ACTION_WHAT = {
    ACTION_LIMIT_OWN: "limiting your own processes",
    ACTION_LIMIT_ANY: "limiting other users' processes and whole units",
    ACTION_MANAGE_RULES: "adding and removing rules",
}


def status_label(status: str) -> str:
    return STATUS_LABEL.get(status, status or "")


def who(pid: int, comm: str) -> str:
    """``PID 9256 (wget)``, as the CLI says it."""
    return f"PID {pid} ({comm})" if comm else f"PID {pid}"


def limits_summary(download: int, upload: int) -> str:
    """``download 50 KB/s, upload unlimited`` (the CLI's wording), or ``no limit``."""
    if not download and not upload:
        return "no limit"
    return f"download {format_limit(download)}, upload {format_limit(upload)}"


def limits_short(download: int, upload: int) -> str:
    """For a table cell: ``↓ 1 MiB/s  ↑ —``, or ``No limit``."""
    if not download and not upload:
        return "No limit"
    d = format_limit(download) if download else "—"
    u = format_limit(upload) if upload else "—"
    return f"↓ {d}  ↑ {u}"


def limited_message(target: str, download: int, upload: int) -> str:
    """What a successful apply says: ``Limited PID 9256 (wget): download 50 KB/s, …``."""
    if not download and not upload:
        return f"Removed the limit of {target}"
    return f"Limited {target}: {limits_summary(download, upload)}"


def permission_reason(action: str, answer: str) -> str:
    """The tooltip of a control that GetPermissions disables or guards with a password."""
    what = ACTION_WHAT.get(action, action)
    if answer == "no":
        return (f"Not allowed: polkit refuses {what} to you (action {action}). "
                f"An administrator can allow it with a polkit rule.")
    if answer == "auth":
        return f"Asks for a password: {what} needs authentication (polkit action {action})"
    return ""


def rule_summary(rule: dict) -> str:
    """One line for a rule of ListRules: what it matches, its scope, limits and state."""
    parts = []
    for key in ("exe", "comm", "cmdline", "unit"):
        if rule.get(key):
            parts.append(f"{key} {rule[key]}")
    if rule.get("uid") is not None and "uid" in rule:
        parts.append(f"uid {rule['uid']}")
    scope = rule.get("scope") or "process"
    parts.append("one budget for all" if scope == "application" else "each process")
    parts.append(limits_summary(int(rule.get("download", 0) or 0),
                                int(rule.get("upload", 0) or 0)))
    if rule.get("permanent"):
        parts.append("permanent")
    if rule.get("enabled") is False:
        parts.append("disabled")
    matched = rule.get("matched")
    if matched is not None:
        parts.append(f"{matched} process{'es' if matched != 1 else ''} now")
    return " · ".join(parts)


def explain(name: str, detail: str = "") -> str:
    """A failed call as one plain sentence (the CLI's wording for the same errors)."""
    detail = (detail or "").strip()
    if name in ("org.freedesktop.DBus.Error.ServiceUnknown",
                "org.freedesktop.DBus.Error.NameHasNoOwner") \
            or name.startswith("org.freedesktop.DBus.Error.Spawn."):
        return f"The chadthrottle daemon is not running. Start it with: {START_HINT}"
    if name in (names.ERR_NOT_AUTHORIZED, "org.freedesktop.DBus.Error.AccessDenied",
                "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired"):
        return (f"Not authorized{': ' + detail if detail else ''}. Limiting your own processes "
                f"needs the polkit action {names.POLKIT_ACTION_LIMIT_OWN}, other users' "
                f"processes {names.POLKIT_ACTION_LIMIT_ANY}, rules {ACTION_MANAGE_RULES}")
    if name == names.ERR_NO_SUCH_PROCESS:
        return f"No such process: {detail}" if detail else "The process has ended"
    if name == names.ERR_NO_SUCH_LIMIT:
        return "It has no limit (any more)"
    if name == names.ERR_NO_SUCH_UNIT:
        return f"No such unit or cgroup: {detail}"
    if name == names.ERR_INVALID_LIMIT:
        return f"Invalid limit: {detail}" if detail else "Invalid limit"
    if name == names.ERR_UNSUPPORTED:
        return f"This kernel or cgroup setup cannot do it: {detail}"
    if name == names.ERR_FAILED:
        return f"The daemon failed unexpectedly ({detail}); see journalctl -u chadthrottled"
    if name == "org.freedesktop.DBus.Error.UnknownMethod":
        return f"This daemon does not offer that yet ({detail})"
    if name == "org.freedesktop.DBus.Error.NoReply":
        return "The daemon did not answer in time"
    return f"{detail} [{name}]" if detail else name
