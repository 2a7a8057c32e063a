"""tests/systemd: the unit under a real systemd (PID 1 in a container on this machine).

The ``machine`` fixture builds (or reuses) the cached Debian tree, boots it, installs the
project inside as a user would (``make install`` from a built clone, runtime dependencies from
the Debian packages), and tears everything down afterwards, failing the run if anything is
left on the host.  See nspawn_machine.py for how, and for what BPF needed inside.

Skipped only where containers cannot run (not root, or namespaces refused), with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from nspawn_machine import SRC_IN_CONTAINER, Machine, MachineError, copy_source, ensure_tree

ROOT = Path(__file__).resolve().parents[2]
BPF_OBJECT = "daemon/chadthrottle/data/throttle.bpf.o"
#: the built clone: the object and the header it was built from (same mtimes as on the host)
BUILT_FILES = (BPF_OBJECT, "bpf/vmlinux.h")
HOST_TOOLS = ("mmdebstrap", "systemd-nspawn", "nsenter", "git", "ip")


def cannot_run_containers() -> str | None:
    if os.geteuid() != 0:
        return "booting a container needs root"
    p = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--net", "--uts", "--ipc",
                        "--cgroup", "true"], capture_output=True, text=True)
    if p.returncode != 0:
        return f"this machine refuses new namespaces: {p.stderr.strip()}"
    return None


def _say(request, text: str) -> None:
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"[systemd] {text}")
    else:
        print(f"[systemd] {text}", file=sys.stderr)


@pytest.fixture(scope="module")
def machine(request):
    reason = cannot_run_containers()
    if reason:
        _say(request, f"skipped: {reason}")
        pytest.skip(reason)
    missing = [t for t in HOST_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing on the host: {', '.join(missing)} (make deps installs mmdebstrap "
                    "and systemd-container)")
    if not (ROOT / BPF_OBJECT).exists():
        pytest.fail(f"{BPF_OBJECT} missing: run `make build` (the object is built on the host "
                    "and shipped as package data)")
    t0 = time.monotonic()
    try:
        tree, build_s = ensure_tree(lambda s: _say(request, s))
    except MachineError as e:
        pytest.fail(str(e))
    _say(request, f"tree {tree} " + (f"built in {build_s:.1f} s" if build_s else "(cached)"))
    source = Path(tempfile.mkdtemp(prefix="chadthrottle-src-"))
    m = Machine(tree, source, log=lambda s: _say(request, s))
    try:
        copy_source(ROOT, source, BUILT_FILES)
        boot_s = m.boot()
        _say(request, f"booted systemd as PID 1 in {boot_s:.1f} s")
        install(m)
        m.baseline = m.network_state()
        _say(request, f"ready after {time.monotonic() - t0:.1f} s")
        yield m
    finally:
        journal = ""
        if m.leader is not None and getattr(request.node, "_systemd_failed", False):
            journal = m.run("journalctl -b --no-pager -n 150 -o short-monotonic",
                            check=False).out
        forced = m.teardown()
        left = m.leftovers()
        _say(request, f"torn down; the whole module took {time.monotonic() - t0:.1f} s")
        if journal:
            _say(request, "last journal lines of the container:\n" + journal)
        for line in forced:
            _say(request, f"teardown: {line}")
        if left:
            pytest.fail("the container left things on the host:\n" + "\n".join(left))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and "machine" in getattr(item, "fixturenames", ()):
        item.parent._systemd_failed = True


def install(m: Machine) -> None:
    """As the README says: make install (PREFIX=/usr/local), then daemon-reload and
    reload dbus.  No compiler in the tree: make must not try to rebuild the object."""
    clang = m.run("command -v clang", check=False)
    assert not clang.ok, "the container tree must not have clang (the object ships prebuilt)"
    r = m.run(f"cd {SRC_IN_CONTAINER} && make install", timeout=300, check=False)
    assert r.ok, f"make install failed inside the container:\n{r}"
    assert "CLANG" not in r.out, f"make install tried to rebuild the BPF object:\n{r}"
    for path in ("/usr/local/bin/chadthrottled", "/usr/local/bin/chadthrottlectl",
                 "/usr/local/lib/systemd/system/chadthrottled.service",
                 "/usr/share/dbus-1/system-services/org.chadthrottle.Throttle1.service",
                 "/usr/share/dbus-1/system.d/org.chadthrottle.Throttle1.conf"):
        assert m.run(f"test -e {path}", check=False).ok, f"make install did not install {path}"
    m.run("systemctl daemon-reload && systemctl reload dbus")

