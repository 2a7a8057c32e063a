"""System tests: root, the real BPF object, real traffic on loopback.

Every fixture removes what it creates (cgroups, processes, links) in a finally block.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

import pytest

from chadthrottle import cgroups
from chadthrottle.bench.traffic import HttpServer
from chadthrottle.engine import Engine

MiB = 1 << 20
BAND = (0.8, 1.25)

pytestmark = pytest.mark.root


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/system" in str(item.fspath):
            item.add_marker(pytest.mark.root)


@pytest.fixture(scope="session", autouse=True)
def _need_root():
    if os.geteuid() != 0:
        pytest.skip("system tests need root (CAP_BPF, CAP_NET_ADMIN)")
    if not shutil.which("curl") or not shutil.which("iperf3"):
        pytest.fail("curl and iperf3 must be installed (make deps)")


@pytest.fixture
def engine():
    eng = Engine()
    eng.open()
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture
def http():
    with HttpServer("127.0.0.1") as srv:
        yield srv


@pytest.fixture
def http6():
    with HttpServer("::1") as srv:
        yield srv


class CgroupTree:
    """A real nested cgroup2 hierarchy below the mount, removed at the end (processes are
    moved back to where they came from first)."""

    def __init__(self):
        self.root = cgroups.cgroup2_mount()
        self.top = f"chadthrottle-test-{uuid.uuid4().hex[:8]}"
        self.made: list[Path] = []
        self.moved: dict[int, str] = {}

    def make(self, rel: str) -> str:
        path = self.root
        for part in (self.top + "/" + rel).split("/"):
            path = path / part
            if not path.exists():
                path.mkdir()
                self.made.append(path)
        return str(path.relative_to(self.root))

    def move(self, pid: int, rel: str) -> None:
        self.moved.setdefault(pid, cgroups.Cgroups(self.root).of_pid(pid))
        (self.root / rel / "cgroup.procs").write_text(str(pid))

    def cleanup(self) -> None:
        for pid, back in self.moved.items():
            try:
                (self.root / back / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass
        for path in reversed(self.made):
            for _ in range(50):
                try:
                    procs = (path / "cgroup.procs").read_text().split()
                    for p in procs:  # stragglers (children of moved processes)
                        try:
                            (self.root / "cgroup.procs").write_text(p)
                        except OSError:
                            pass
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


@pytest.fixture
def cgroup_tree():
    tree = CgroupTree()
    try:
        yield tree
    finally:
        tree.cleanup()


def in_band(ratio: float) -> bool:
    return BAND[0] <= ratio <= BAND[1]
