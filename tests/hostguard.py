"""What a test session may not leave behind on the machine.

A snapshot is taken when the session starts and compared when it ends: network devices,
namespaces, the qdiscs and ingress filters of devices that were already there (a clsact left
on the uplink is the kind of thing this catches), cgroups and temp dirs named after the
project, users added, pinned BPF objects and the daemon's own default directories.  Anything
new is reported and fails the run (``pytest_sessionfinish`` in conftest.py)."""

from __future__ import annotations

import glob
import os
import pwd
import subprocess
import tempfile

OURS = ("chadthrottle", "ctifb", "ct-", "ctt")


def _cgroup2_mount() -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] == "cgroup2":
                return left.split()[4]
    return None


def _tc(*args: str) -> str:
    r = subprocess.run(["tc", *args], capture_output=True, text=True, timeout=10)
    return r.stdout.strip()


def snapshot() -> dict[str, set[str]]:
    snap: dict[str, set[str]] = {}
    links = set(os.listdir("/sys/class/net"))
    snap["network devices"] = links
    qd: set[str] = set()
    for dev in sorted(links):
        for line in _tc("qdisc", "show", "dev", dev).splitlines():
            qd.add(f"{dev}: {' '.join(w for w in line.split() if not w.isdigit())}")
        for line in _tc("filter", "show", "dev", dev, "ingress").splitlines():
            qd.add(f"{dev} ingress filter: {line.strip()}")
    snap["qdiscs and ingress filters"] = qd
    netns = "/run/netns"
    snap["network namespaces"] = set(os.listdir(netns)) if os.path.isdir(netns) else set()
    root = _cgroup2_mount()
    cg: set[str] = set()
    if root:
        for dirpath, dirnames, _ in os.walk(root):
            for d in dirnames:
                if d.startswith(OURS) or "chadthrottle" in d:
                    cg.add(os.path.relpath(os.path.join(dirpath, d), root))
    snap["cgroups"] = cg
    snap["users"] = {p.pw_name for p in pwd.getpwall()}
    snap["pinned BPF objects"] = set(glob.glob("/sys/fs/bpf/**", recursive=True)) \
        if os.path.isdir("/sys/fs/bpf") else set()
    snap["daemon default dirs"] = {p for p in ("/run/chadthrottle", "/etc/chadthrottle",
                                               "/run/chadthrottled.sock")
                                   if os.path.exists(p)}
    snap["temp dirs"] = set(glob.glob(os.path.join(tempfile.gettempdir(), "chadthrottle-*")))
    return snap


def leftovers(before: dict[str, set[str]], after: dict[str, set[str]],
              skip: set[str] = frozenset()) -> dict[str, list[str]]:
    """What is in ``after`` and not in ``before`` (ignoring the paths in ``skip``)."""
    out = {}
    for key, now in after.items():
        new = sorted(x for x in now - before.get(key, set()) if x not in skip)
        if new:
            out[key] = new
    return out
