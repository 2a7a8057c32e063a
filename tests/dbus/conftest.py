"""Fixtures for tests that need a real bus: a private dbus-daemon with the project's policy,
and the real chadthrottled on it.  Everything started here is stopped by its pid in a
``finally``; every directory created here is removed.

Other test folders may reuse them with ``pytest_plugins = ["tests.dbus.conftest"]`` or by
importing the helpers (``Bus``, ``start_daemon``, ``dbus_send``).
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SRC = ROOT / "daemon"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from chadthrottle import names  # noqa: E402
from chadthrottle.procfs import terminate  # noqa: E402
from chadthrottle.server.devrun import PrivateBus  # noqa: E402

BPF_OBJECT = SRC / "chadthrottle" / "data" / names.BPF_OBJECT_FILE
DAEMON_STOP_TIMEOUT = 15.0
POLKITD = Path("/usr/lib/polkit-1/polkitd")
POLKIT_ACTIONS_DIR = Path("/usr/share/polkit-1/actions")
POLKIT_RULES_DIR = Path("/etc/polkit-1/rules.d")
POLKIT_POLICY = ROOT / "dbus" / "org.chadthrottle.throttle.policy"
POLKIT_NAME = "org.freedesktop.PolicyKit1"

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (BPF, cgroups, users)")
requires_bpf_object = pytest.mark.skipif(
    not BPF_OBJECT.exists(), reason=f"{BPF_OBJECT} missing: run `make build`"
)


def env_with(address: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DBUS_SYSTEM_BUS_ADDRESS"] = address
    env["PYTHONPATH"] = str(SRC) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    env.update(extra)
    return env


@dataclass
class Reply:
    ok: bool
    error: str | None  # D-Bus error name
    text: str  # stdout on success, error text otherwise


def dbus_send(address: str, member: str, *args: str, interface: str = names.INTERFACE,
              uid: int | None = None, gid: int | None = None, timeout: float = 30) -> Reply:
    """A real client: ``dbus-send --system --print-reply`` (as ``uid`` if given)."""
    cmd = ["dbus-send", "--system", "--print-reply", f"--reply-timeout={int(timeout * 1000)}",
           f"--dest={names.BUS_NAME}", names.OBJECT_PATH, f"{interface}.{member}", *args]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid if gid is not None else uid}",
               "--clear-groups", *cmd]
    p = subprocess.run(cmd, env=env_with(address), capture_output=True, text=True,
                       timeout=timeout + 5)
    if p.returncode == 0:
        return Reply(True, None, p.stdout)
    m = re.match(r"Error (\S+): ?(.*)", p.stderr.strip(), re.S)
    return Reply(False, m.group(1) if m else "?", m.group(2) if m else p.stderr)


def name_has_owner(address: str, name: str) -> bool:
    p = subprocess.run(
        ["dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.DBus",
         "/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner", f"string:{name}"],
        env=env_with(address), capture_output=True, text=True, timeout=10)
    return "boolean true" in p.stdout


def stop_pid(proc: subprocess.Popen, timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL, by this process's own pid."""
    return terminate(proc, timeout)


@dataclass
class Daemon:
    proc: subprocess.Popen
    address: str
    log_path: Path
    pid: int = field(init=False)

    def __post_init__(self) -> None:
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, member: str, *args: str, **kw) -> Reply:
        return dbus_send(self.address, member, *args, **kw)

    def stop(self) -> int:
        return stop_pid(self.proc, DAEMON_STOP_TIMEOUT)


def start_daemon(address: str, log_path: Path, *extra_args: str, prefix: list[str] | None = None,
                 env: dict[str, str] | None = None, timeout: float = 20.0) -> Daemon:
    """Start the real chadthrottled on ``address`` and wait until it owns its name.  Unless
    ``env`` says otherwise, it keeps its state and reads its rules next to its log (a daemon
    of its own: no limit or rule of another test comes back in it)."""
    cmd = [*(prefix or []), sys.executable, "-m", "chadthrottle.server.main",
           "--log-target=stderr", *extra_args]
    if env is None:
        env = env_with(address,
                       CHADTHROTTLE_STATE_DIR=str(log_path.with_name(log_path.stem + "-state")),
                       CHADTHROTTLE_CONFIG_DIR=str(log_path.with_name(log_path.stem + "-etc")))
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed below, the child keeps its copy
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log_file.close()
    d = Daemon(proc, address, log_path)
    deadline = time.monotonic() + timeout
    while not name_has_owner(address, names.BUS_NAME):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_pid(proc)
            raise RuntimeError(f"chadthrottled did not come up (rc={proc.returncode}):\n"
                               + d.log()[-4000:])
        time.sleep(0.05)
    return d


@pytest.fixture(scope="session")
def system_bus():
    """A private dbus-daemon with a system-like config and OUR dbus/ policy; its address.

    The socket is world-connectable (tests connect as an unprivileged user and polkitd).
    """
    yield from _private_bus(default_limits=False)


@pytest.fixture
def daemon(system_bus, tmp_path):
    """The real chadthrottled on the private bus; asserts it exits 0 on SIGTERM."""
    if os.geteuid() != 0:
        pytest.skip("chadthrottled needs root")
    if not BPF_OBJECT.exists():
        pytest.skip(f"{BPF_OBJECT} missing: run `make build`")
    d = start_daemon(system_bus, tmp_path / "chadthrottled.log")
    try:
        yield d
    finally:
        rc = d.stop()
        assert rc == 0, f"chadthrottled exited {rc} on SIGTERM:\n{d.log()[-4000:]}"


@pytest.fixture
def sleeper():
    """A factory of idle processes (optionally as another uid), stopped by pid afterwards."""
    procs: list[subprocess.Popen] = []

    def make(uid: int | None = None, gid: int | None = None) -> subprocess.Popen:
        cmd = ["sleep", "300"]
        if uid is not None:
            cmd = ["setpriv", f"--reuid={uid}", f"--regid={gid if gid is not None else uid}",
                   "--clear-groups", *cmd]
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        yield make
    finally:
        for p in procs:
            stop_pid(p)


def _private_bus(default_limits: bool):
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon is not installed")
    d = tempfile.mkdtemp(prefix="chadthrottle-bus-")
    os.chmod(d, 0o755)
    bus = PrivateBus(d, policy_dir=ROOT / "dbus", default_limits=default_limits)
    try:
        yield bus.start()
    finally:
        bus.stop()  # by pid; removes the directory
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def default_limits_bus():
    """A private bus with dbus-daemon's built-in limits (128 pending replies per
    connection, 256 connections per user), as a distribution's system bus has; its address.
    The session's ``system_bus`` raises them for benchmarks, which hides limit bugs."""
    yield from _private_bus(default_limits=True)


# --------------------------------------------------------------------------- users, polkit
def _throwaway_user():
    name = "ctt" + secrets.token_hex(4)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "--user-group", name], check=True, capture_output=True)
    try:
        pw = pwd.getpwnam(name)
        yield name, pw.pw_uid, pw.pw_gid
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def user():
    """A fresh system user without home or shell; (name, uid, gid); removed afterwards."""
    yield from _throwaway_user()


@pytest.fixture
def another_user():
    """A second fresh system user, like ``user``."""
    yield from _throwaway_user()


def as_user(uid: int, gid: int | None = None) -> list[str]:
    """The command prefix that runs a command as ``uid`` (no supplementary groups)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid if gid is not None else uid}",
            "--clear-groups"]


def rules_allowing_own(*user_names: str) -> str:
    """polkit rules: these users may limit their own processes (limit-own), nothing more."""
    return "".join(f"""
polkit.addRule(function(action, subject) {{
    if (action.id == "{names.POLKIT_ACTION_LIMIT_OWN}" && subject.user == "{name}")
        return polkit.Result.YES;
}});
""" for name in user_names)


def run_polkitd(address: str, rules: str | None):
    """Generator for fixtures: the real polkitd on the private bus ``address`` with our
    action file (and optional rules), stopped by pid; files it installed are removed."""
    if not POLKITD.exists():
        pytest.skip("polkitd is not installed")
    installed_policy = None
    rules_file = None
    proc = None
    try:
        target = POLKIT_ACTIONS_DIR / POLKIT_POLICY.name
        if not target.exists():
            shutil.copyfile(POLKIT_POLICY, target)
            installed_policy = target
        if rules is not None:
            rules_file = POLKIT_RULES_DIR / f"10-chadthrottle-test-{secrets.token_hex(4)}.rules"
            rules_file.write_text(rules)
            shutil.chown(rules_file, "polkitd", "root")
            rules_file.chmod(0o644)
        proc = subprocess.Popen([str(POLKITD), "--no-debug"], env=env_with(address),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 15
        while not name_has_owner(address, POLKIT_NAME):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read() if proc.poll() is not None else ""
                pytest.fail(f"polkitd did not come up on the private bus: {err}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc is not None:
            stop_pid(proc)
        if rules_file is not None:
            rules_file.unlink(missing_ok=True)
        if installed_policy is not None:
            installed_policy.unlink(missing_ok=True)


# --------------------------------------------------------------------------- signals
class Listener:
    """tests/dbus/signal_listener.py as a real client (optionally as another user); the
    signals it received, parsed; stopped by its pid."""

    def __init__(self, address: str, *rules: str, prefix: list[str] | None = None,
                 subscribe: int | None = None) -> None:
        sub = ["--subscribe", str(subscribe)] if subscribe is not None else []
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-u", str(HERE / "signal_listener.py"), address,
             *sub, *rules], env=env_with(address), stdout=subprocess.PIPE, text=True)
        self.lines: list[dict] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        deadline = time.monotonic() + 10
        while not any("ready" in x or "error" in x for x in self.lines):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.lines
            time.sleep(0.02)
        assert "error" not in self.lines[0], self.lines
        self.unique_name = self.lines[0]["ready"]
        self.subscribed = self.lines[0].get("subscribed")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(json.loads(line))

    def signals(self) -> list[dict]:
        return [x for x in self.lines if "member" in x]

    def wait_for(self, pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(pred(s) for s in self.signals()):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        stop_pid(self.proc)
