"""Run inside ``unshare --mount --propagation private``: a standalone systemd-journald on
private tmpfs mounts (/run, /var/log/journal), and chadthrottled logging to it.

    journal_ns.py WORKDIR BUS_ADDRESS [DAEMON_ARGUMENT...]

Writes WORKDIR/daemon.pid once the daemon runs; waits for WORKDIR/stop (its content: a
pid), then stops the daemon (SIGTERM, exit code to WORKDIR/daemon.rc), writes
``journalctl CHADTHROTTLE_PID=<pid> -o json`` to WORKDIR/journal.json and the whole
journal to WORKDIR/all.json, and stops journald — all by pid.  The mounts vanish with
the namespace.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

JOURNALD = "/lib/systemd/systemd-journald"


def main() -> int:
    work, address = Path(sys.argv[1]), sys.argv[2]
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
    os.makedirs("/run/systemd/journal", exist_ok=True)
    os.makedirs("/run/log/journal", exist_ok=True)
    if os.path.isdir("/var/log/journal"):
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/var/log/journal"], check=True)
    journald = subprocess.Popen([JOURNALD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = None
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists("/run/systemd/journal/socket"):
            if journald.poll() is not None or time.monotonic() > deadline:
                print(f"journald did not start (rc={journald.returncode})", file=sys.stderr)
                return 1
            time.sleep(0.05)
        env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=address)
        # --log-target=auto: the journal socket exists now, so the journal is chosen
        daemon = subprocess.Popen([sys.executable, "-m", "chadthrottle.server.main",
                                   *sys.argv[3:]], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=open(work / "daemon.stderr", "wb"))  # noqa: SIM115
        (work / "daemon.pid").write_text(str(daemon.pid))
        stop = work / "stop"
        while not stop.exists():
            if daemon.poll() is not None:
                break
            time.sleep(0.1)
        pid = stop.read_text().strip() if stop.exists() else "0"
        if daemon.poll() is None:
            daemon.terminate()
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        (work / "daemon.rc").write_text(str(daemon.returncode))
        time.sleep(0.3)
        jc = ["journalctl", "-D", "/run/log/journal", "--no-pager", "-o", "json"]
        (work / "journal.json").write_text(
            subprocess.run([*jc, f"CHADTHROTTLE_PID={pid}"], capture_output=True,
                           text=True).stdout)
        (work / "all.json").write_text(
            subprocess.run(jc, capture_output=True, text=True).stdout)
        return 0
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        journald.terminate()
        try:
            journald.wait(5)
        except subprocess.TimeoutExpired:
            journald.kill()
            journald.wait()


if __name__ == "__main__":
    sys.exit(main())
