"""``make run``: the daemon in the foreground, on the system bus — or on a private one.

Where a system bus answers (DBUS_SYSTEM_BUS_ADDRESS or /run/dbus/system_bus_socket), the
daemon runs on it (our bus policy is installed in /etc/dbus-1/system.d/ first if the bus
does not know it, and the bus is told to reload).  Where none does (containers, VMs
without systemd), a private ``dbus-daemon`` is started with the project's policy from
``dbus/`` and the line to paste into other shells is printed::

    export DBUS_SYSTEM_BUS_ADDRESS=unix:path=/run/chadthrottle-dev/system_bus_socket

The private bus is stopped (by its pid) and its directory removed when the daemon exits.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from xml.sax.saxutils import escape

from ..procfs import terminate

DEFAULT_SOCKET = "/run/dbus/system_bus_socket"
DEV_DIR = Path("/run/chadthrottle-dev")
POLICY_NAME = "org.chadthrottle.Throttle1.conf"
SYSTEM_POLICY_DIRS = (Path("/etc/dbus-1/system.d"), Path("/usr/share/dbus-1/system.d"),
                      Path("/usr/local/share/dbus-1/system.d"))
POLKIT_BUS_POLICY = "/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf"

BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- A private system-like bus for chadthrottle development and tests: the default policy
     of the system bus (deny own, deny method calls unless a policy file allows them), the
     project's own policy, polkit's, and nothing else.  No fork, no user switch. -->
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
    <deny send_destination="org.freedesktop.DBus"
          send_interface="org.freedesktop.DBus.Debug.Stats"/>
  </policy>
  <policy user="root">
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Monitoring"/>
  </policy>
  <include ignore_missing="yes">{project_policy}</include>
  <include ignore_missing="yes">{polkit_policy}</include>
{limits}</busconfig>
"""


def project_dbus_dir() -> Path:
    """``dbus/`` of the source tree this module runs from."""
    return Path(__file__).resolve().parents[3] / "dbus"


#: raised limits for development (many concurrent benchmark calls on one connection); the
#: distribution's system bus keeps dbus-daemon's built-in defaults (128 pending replies per
#: connection, 256 connections per user) -- ``default_limits=True`` keeps those.
RAISED_LIMITS = """\
  <limit name="max_replies_per_connection">50000</limit>
  <limit name="max_connections_per_user">2048</limit>
"""


def bus_config(socket_path: str | os.PathLike, policy_dir: str | os.PathLike | None = None,
               *, default_limits: bool = False) -> str:
    policy_dir = Path(policy_dir) if policy_dir else project_dbus_dir()
    return BUS_CONFIG.format(
        socket=escape(str(socket_path)),
        project_policy=escape(str(policy_dir / POLICY_NAME)),
        polkit_policy=escape(POLKIT_BUS_POLICY),
        limits="" if default_limits else RAISED_LIMITS,
    )


def socket_answers(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(path)
        return True
    except OSError:
        return False


def address_socket(address: str) -> str | None:
    """The filesystem socket path of a ``unix:path=...`` address (first transport only)."""
    first = address.split(";")[0]
    if not first.startswith("unix:"):
        return None
    for kv in first[5:].split(","):
        k, _, v = kv.partition("=")
        if k == "path":
            return v
    return None


def system_bus_reachable() -> str | None:
    """The address of a system bus that answers, or None."""
    env = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    if env:
        path = address_socket(env)
        if path is None or socket_answers(path):
            return env
        return None
    if socket_answers(DEFAULT_SOCKET):
        return "unix:path=" + DEFAULT_SOCKET
    return None


class PrivateBus:
    """A dbus-daemon of our own; ``stop()`` kills it by pid and removes its directory.

    ``default_limits``: keep dbus-daemon's built-in limits, as a distribution's system bus
    does, instead of the raised development limits (which hide limit-related bugs).
    """

    def __init__(self, directory: str | os.PathLike, policy_dir=None, *,
                 default_limits: bool = False) -> None:
        self.dir = Path(directory)
        self.socket = self.dir / "system_bus_socket"
        self.address = f"unix:path={self.socket}"
        self.policy_dir = policy_dir
        self.default_limits = default_limits
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> str:
        self.dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        if self.socket.exists():
            self.socket.unlink()
        conf = self.dir / "bus.conf"
        conf.write_text(bus_config(self.socket, self.policy_dir,
                                   default_limits=self.default_limits))
        self.proc = subprocess.Popen(
            ["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={conf}"],
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not socket_answers(str(self.socket)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"dbus-daemon exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("dbus-daemon did not open its socket")
            time.sleep(0.02)
        # world-connectable, like the real system bus (polkit tests connect as other users)
        os.chmod(self.socket, 0o666)
        return self.address

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PrivateBus:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def ensure_policy_installed(address: str) -> None:
    """On a real system bus: install our bus policy if missing and make the bus reload."""
    if any((d / POLICY_NAME).exists() for d in SYSTEM_POLICY_DIRS):
        return
    target = SYSTEM_POLICY_DIRS[0] / POLICY_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(project_dbus_dir() / POLICY_NAME, target)
    print(f"devrun: installed {target}; asking the bus to reload", file=sys.stderr)
    subprocess.run(
        ["dbus-send", "--system", "--type=method_call", "--dest=org.freedesktop.DBus",
         "/org/freedesktop/DBus", "org.freedesktop.DBus.ReloadConfig"],
        env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address}, check=False,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chadthrottle.server.devrun",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--private-bus", action="store_true",
                   help="always start a private bus, even if a system bus answers")
    p.add_argument("--bus-dir", default=str(DEV_DIR),
                   help=f"directory of the private bus (default: {DEV_DIR})")
    p.add_argument("--default-limits", action="store_true",
                   help="keep dbus-daemon's built-in limits on the private bus (128 pending "
                        "replies per connection), as on a distribution's system bus")
    args, daemon_args = p.parse_known_args(argv)
    if os.geteuid() != 0:
        print("devrun: chadthrottled needs root (BPF, cgroups): run it with sudo", file=sys.stderr)
        return 1

    address = None if args.private_bus else system_bus_reachable()
    bus = None
    if address:
        ensure_policy_installed(address)
        print(f"devrun: using the system bus at {address}", file=sys.stderr)
    else:
        bus = PrivateBus(args.bus_dir, default_limits=args.default_limits)
        address = bus.start()
        print("devrun: no system bus is running; started a private one. In other shells:",
              file=sys.stderr)
        print(f"export DBUS_SYSTEM_BUS_ADDRESS={address}", flush=True)
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "chadthrottle.server.main", "--log-target=stderr", *daemon_args],
        env=env,
    )
    # the terminal's Ctrl-C reaches both; forward SIGTERM/SIGHUP to the daemon only
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: daemon.send_signal(signal.SIGTERM))
    try:
        while True:
            try:
                code = daemon.wait()
                break
            except KeyboardInterrupt:
                continue  # the daemon got SIGINT too and is detaching
    finally:
        if daemon.poll() is None:
            daemon.terminate()
            daemon.wait()
        if bus is not None:
            bus.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
