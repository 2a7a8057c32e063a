"""Network namespaces for benchmarks and tests: a private one (clean counters, nothing else's
traffic), and the "home link" — a server behind a bottleneck, reached over a veth.

Everything made here is removed on exit, failure included: namespaces by name, devices with
them, processes by pid.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import secrets
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter_private_netns() -> None:
    """Move this process into a new network namespace with only loopback (up).  For a
    process that stays there (a benchmark run): its children follow."""
    _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


@contextmanager
def inside(netns_path: str | os.PathLike):
    """This thread (and the processes and threads it starts) in another network namespace,
    then back."""
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(str(netns_path), os.O_RDONLY)
    try:
        _check(_libc.setns(target, CLONE_NEWNET), f"setns({netns_path})")
        try:
            yield
        finally:
            _check(_libc.setns(back, CLONE_NEWNET), "setns(back)")
    finally:
        os.close(target)
        os.close(back)


def ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *(["-n", netns] if netns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def tc(*args: str, netns: str | None = None) -> None:
    cmd = ["tc", *(["-n", netns] if netns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@dataclass
class HomeLink:
    """Two namespaces joined by a veth: ``far`` holds a server whose egress is the
    bottleneck (a tbf at ``link`` bytes/s with a queue of ``queue_ms``, which gives the
    RTT), ``near`` holds the clients (and the limiter, entered with :func:`inside`)."""

    link: int
    queue_ms: int = 50
    near: str = ""
    far: str = ""
    near_ip: str = "10.199.0.2"
    far_ip: str = "10.199.0.1"
    near_dev: str = ""

    def __post_init__(self) -> None:
        tag = secrets.token_hex(3)
        self.near = self.near or f"ct-near-{tag}"
        self.far = self.far or f"ct-far-{tag}"
        self.near_dev = f"ctn{tag}"
        self._far_dev = f"ctf{tag}"

    @property
    def near_path(self) -> Path:
        return Path("/run/netns") / self.near

    def up(self) -> HomeLink:
        try:
            ip("netns", "add", self.near)
            ip("netns", "add", self.far)
            ip("link", "add", self.near_dev, "netns", self.near, "type", "veth", "peer", "name",
               self._far_dev, "netns", self.far)
            ip("addr", "add", f"{self.near_ip}/24", "dev", self.near_dev, netns=self.near)
            ip("addr", "add", f"{self.far_ip}/24", "dev", self._far_dev, netns=self.far)
            for ns, dev in ((self.near, self.near_dev), (self.far, self._far_dev)):
                ip("link", "set", "lo", "up", netns=ns)
                ip("link", "set", dev, "up", netns=ns)
            # the bottleneck: the far side's egress (the provider's end of a home downlink)
            burst = max(self.link // 100, 16 * 1024)
            tc("qdisc", "add", "dev", self._far_dev, "root", "tbf", "rate", f"{self.link * 8}bit",
               "burst", str(burst), "latency", f"{self.queue_ms}ms", netns=self.far)
        except BaseException:
            self.down()
            raise
        return self

    def far_process(self, argv: list[str], **kw) -> subprocess.Popen:
        """A process in the far namespace (``ip netns exec``)."""
        return subprocess.Popen(["ip", "netns", "exec", self.far, *argv], **kw)

    def retransmits(self, side: str = "far") -> int:
        """RetransSegs of one side's namespace (the server sends, so "far" for downloads)."""
        ns = self.far if side == "far" else self.near
        out = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        tcp = [ln.split() for ln in out if ln.startswith("Tcp:")]
        return int(tcp[1][tcp[0].index("RetransSegs")])

    def down(self) -> None:
        for ns in (self.near, self.far):  # devices go with their namespace
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def __enter__(self) -> HomeLink:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
