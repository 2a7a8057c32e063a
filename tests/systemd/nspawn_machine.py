"""systemd as PID 1 in a container on this machine, for tests/systemd.

How it boots (DESIGN §3d):

* ``mmdebstrap --variant=minbase --include=<PACKAGES> bookworm TREE`` builds a minimal Debian
  tree from the Debian packages.  It is cached under ``/var/cache/chadthrottle-test/`` in a
  directory named after a hash of the suite, the variant and the package list; a tree without
  its completion stamp (an interrupted build) or without systemd/python is rebuilt.  Builds
  and deletions take an exclusive lock, boots a shared one.
* ``systemd-nspawn -D TREE --volatile=overlay -b`` boots it: the tree is the read-only lower
  layer of an overlay whose upper layer is a tmpfs, so nothing a test does reaches the cache.
  ``--register=no --keep-unit`` because this host runs no systemd; ``--private-network`` so
  the container's traffic never leaves its own loopback.
* What BPF needed inside, found by trying (kernel 6.18, systemd 252, hybrid cgroups):
  ``--capability=CAP_BPF,CAP_PERFMON`` (nspawn's default set lacks both: without CAP_BPF the
  object does not load, EPERM; without CAP_PERFMON the tp_btf fork/exit programs do not,
  EINVAL) and ``--system-call-filter=bpf`` (nspawn's seccomp filter refuses bpf(2) with
  EPERM).  Nothing else: CAP_NET_ADMIN and CAP_SYS_PTRACE are in nspawn's default set, the
  container's own sysfs has ``/sys/kernel/btf/vmlinux``, the daemon pins nothing in
  ``/sys/fs/bpf``, CAP_SYS_RESOURCE is not needed (BPF memory is charged to the memory cgroup),
  and the container's cgroup2 hierarchy (``/sys/fs/cgroup/unified``, hybrid like the host's,
  in a cgroup namespace) is writable by its systemd.
* nspawn runs in a cgroup of its own (``chadthrottle-test-*`` at the root of the host's
  cgroup2 and name=systemd hierarchies): with ``--keep-unit`` it creates ``payload`` and
  ``supervisor`` below the cgroup it was started in, and this keeps them out of the host's
  root.  Teardown removes that subtree.

Commands run inside through ``nsenter --all`` into the container's PID 1 namespaces, with a
clean environment.  Teardown: ``systemctl poweroff`` inside, SIGTERM to nspawn, SIGKILL to
the container's PID 1 and nspawn as a last resort; then the cgroups, the source copy and the
``/run/systemd/nspawn`` directory nspawn created are removed, and ``leftovers()`` says what,
if anything, is still there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"
VARIANT = "minbase"
#: systemd + dbus (DESIGN §3d), the runtime dependencies of chadthrottle from the Debian
#: packages (python3-dbus-fast, python3-systemd, python3-rich, python3-tomli-w,
#: python3-prometheus-client, libbpf1, iproute2 for the download queues), what ``make
#: install`` needs (make, pip, setuptools, wheel; no clang: the BPF object is built on the
#: host and ships as package data), and the tools the checks use (bpftool, curl, procps).
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "libpam-systemd",
    "python3", "python3-dbus-fast", "python3-systemd", "python3-rich", "libbpf1",
    "python3-tomli-w", "python3-prometheus-client",
    "make", "python3-pip", "python3-setuptools", "python3-wheel",
    "bpftool", "iproute2", "curl", "procps",
)
#: what Debian 12 does not package in a version the project needs: ``make install`` installs
#: it with pip, as on any bookworm machine.  The container has no network, so pip's download
#: is made on the host when the tree is built and left in WHEELS for pip to find there.
PIP_ONLY = ("pydantic>=2.5,<3",)
WHEELS = "opt/chadthrottle-wheels"
#: what BPF needs inside the container (see the module docstring for why each)
BPF_FLAGS = ("--capability=CAP_BPF,CAP_PERFMON", "--system-call-filter=bpf")
CACHE_DIR = Path(os.environ.get("CHADTHROTTLE_TEST_CACHE", "/var/cache/chadthrottle-test"))
STAMP = ".chadthrottle-tree"
TREE_MUST_HAVE = ("usr/lib/systemd/systemd", "usr/bin/dbus-daemon", "usr/bin/python3",
                  "usr/bin/make", "usr/sbin/bpftool", "usr/bin/curl", "sbin/init")
CG_PREFIX = "chadthrottle-test-"
SRC_IN_CONTAINER = "/usr/src/chadthrottle"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 90.0


class MachineError(RuntimeError):
    pass


def tree_key() -> str:
    spec = {"suite": SUITE, "variant": VARIANT, "packages": sorted(PACKAGES),
            "pip": sorted(PIP_ONLY), "format": 2}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def tree_path() -> Path:
    return CACHE_DIR / f"{SUITE}-{tree_key()}"


def tree_is_sound(tree: Path) -> bool:
    try:
        if (tree / STAMP).read_text().strip() != tree_key():
            return False
    except OSError:
        return False
    return all((tree / p).exists() for p in TREE_MUST_HAVE)


@contextlib.contextmanager
def cache_lock(exclusive: bool, blocking: bool = True):
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    fd = os.open(CACHE_DIR / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        if not blocking:
            flags |= fcntl.LOCK_NB
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def ensure_tree(log: Callable[[str], None] = print) -> tuple[Path, float]:
    """The cached tree (built if missing or broken) and the seconds spent building it."""
    tree = tree_path()
    with cache_lock(exclusive=False):
        if tree_is_sound(tree):
            return tree, 0.0
    with cache_lock(exclusive=True):
        if tree_is_sound(tree):
            return tree, 0.0
        # the trees of other package lists (older versions of this file) go: bounded disk
        for old in CACHE_DIR.glob(f"{SUITE}-*"):
            if old.is_dir() and old != tree:
                shutil.rmtree(old, ignore_errors=True)
        if tree.exists():
            log(f"cached tree {tree} is incomplete: rebuilding")
            shutil.rmtree(tree)
        tmp = CACHE_DIR / f".build-{tree.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.monotonic()
        cmd = ["mmdebstrap", f"--variant={VARIANT}", "--include=" + ",".join(PACKAGES),
               SUITE, str(tmp)]
        log("building the container tree: " + " ".join(cmd))
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=900)
        if p.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise MachineError(f"mmdebstrap failed (rc={p.returncode}):\n{p.stderr[-4000:]}")
        wheels = ["pip", "download", "--quiet", "--only-binary=:all:", "--dest",
                  str(tmp / WHEELS), "--python-version", "3.11", "--implementation", "cp",
                  "--platform", "manylinux2014_x86_64", *PIP_ONLY]
        log("downloading for the tree: " + " ".join(wheels))
        p = subprocess.run([sys.executable, "-m", *wheels], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise MachineError(f"pip download failed (rc={p.returncode}):\n{p.stderr[-4000:]}")
        (tmp / STAMP).write_text(tree_key() + "\n")
        tmp.rename(tree)
        return tree, time.monotonic() - t0


def copy_source(root: Path, dest: Path, extra: tuple[str, ...]) -> None:
    """A built clone: the tracked files plus ``extra`` (the BPF object and vmlinux.h), with
    their modification times, so ``make install`` sees the object up to date."""
    files = subprocess.run(["git", "-C", str(root), "ls-files", "-z"], capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in [f for f in files if f] + list(extra):
        src = root / rel
        if not src.is_file():
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)


# ---- cgroups of the host ---------------------------------------------------------------------

def host_cgroup_roots() -> list[Path]:
    """The cgroup2 mount and the name=systemd v1 mount (hybrid hosts), where nspawn creates
    the container's cgroups."""
    roots = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            fields, post_fields = pre.split(), post.split()
            fstype, opts = post_fields[0], post_fields[2] if len(post_fields) > 2 else ""
            if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in opts.split(",")):
                roots.append(Path(fields[4]))
    return roots


def _cgroup_dirs_bottom_up(top: Path) -> list[Path]:
    dirs = [Path(d) for d, _, _ in os.walk(top)]
    return sorted(dirs, key=lambda p: len(p.parts), reverse=True)


def _cgroup_pids(top: Path) -> list[int]:
    pids = []
    for d in _cgroup_dirs_bottom_up(top):
        with contextlib.suppress(OSError):
            pids += [int(x) for x in (d / "cgroup.procs").read_text().split()]
    return pids


def remove_cgroup_tree(top: Path, timeout: float = 10.0) -> list[str]:
    """Kill what is left in ``top`` (processes of the container: ours) and remove it."""
    problems = []
    if not top.exists():
        return problems
    deadline = time.monotonic() + timeout
    while _cgroup_pids(top) and time.monotonic() < deadline:
        if (top / "cgroup.kill").exists():
            with contextlib.suppress(OSError):
                (top / "cgroup.kill").write_text("1")
        else:
            for pid in _cgroup_pids(top):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    left = _cgroup_pids(top)
    if left:
        problems.append(f"processes still in {top}: {left}")
    for d in _cgroup_dirs_bottom_up(top):
        for _ in range(50):
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        if d.exists():
            problems.append(f"cgroup not removed: {d}")
    return problems


# ---- the machine ------------------------------------------------------------------------------

@dataclass
class Result:
    rc: int
    out: str
    err: str
    cmd: str

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def __str__(self) -> str:
        return f"$ {self.cmd}\n(rc={self.rc})\n{self.out}{self.err}"


def host_snapshot(names: tuple[str, ...] = ()) -> dict[str, set[str]]:
    """What a container could leave on the host, to compare before and after.  Only what
    nspawn or this module creates is looked at, so other work on the machine does not count:
    cgroups at the roots named ``chadthrottle-test-*`` or nspawn's ``payload``/``supervisor``,
    nspawn's tmp dirs, run dir and veth links (``ve-*``/``vb-*``), mounts below ``names``."""
    snap: dict[str, set[str]] = {}
    ours = (CG_PREFIX, "payload", "supervisor")
    for root in host_cgroup_roots():
        snap[f"cgroups in {root}"] = {p.name for p in root.iterdir()
                                      if p.is_dir() and p.name.startswith(ours)}
    snap["/tmp/nspawn-*"] = {p.name for p in Path("/tmp").glob("nspawn-*")}
    snap["/run/systemd/nspawn"] = {"exists"} if Path("/run/systemd/nspawn").exists() else set()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True)
    snap["nspawn network links"] = {
        n for n in (ln.split(":")[1].strip().split("@")[0]
                    for ln in links.stdout.splitlines() if ln.count(":") >= 2)
        if n.startswith(("ve-", "vb-"))}
    with open("/proc/self/mountinfo") as f:
        snap["mounts"] = {m for m in (ln.split()[4] for ln in f)
                          if any(m.startswith(n) for n in names)}
    snap["nspawn lock files in the cache"] = (
        {p.name for p in CACHE_DIR.glob(".#*")} if CACHE_DIR.exists() else set())
    return snap


class Machine:
    """One booted container.  Use as a context manager: ``__exit__`` always tears it down."""

    def __init__(self, tree: Path, source: Path, log: Callable[[str], None] = print) -> None:
        self.tree = tree
        self.source = source
        self.log = log
        self.name = f"{CG_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.cgroups = [root / self.name for root in host_cgroup_roots()]
        self.workdir = Path(tempfile.mkdtemp(prefix="chadthrottle-systemd-"))
        self.console = self.workdir / "console.log"
        self.nspawn: subprocess.Popen | None = None
        self.leader: int | None = None
        self.before = self._snapshot()
        self._had_nspawn_run_dir = Path("/run/systemd/nspawn").exists()
        self._shared_lock = None
        self.baseline: dict[str, str] = {}  # what the tests compare against (conftest)

    # -- boot -----------------------------------------------------------------------------
    def argv(self) -> list[str]:
        return [
            "systemd-nspawn", "-D", str(self.tree), "--volatile=overlay",
            "--private-network", "--register=no", "--keep-unit", "--link-journal=no",
            "--console=read-only", f"--machine={self.name[:60]}",
            *BPF_FLAGS,
            f"--bind={self.source}:{SRC_IN_CONTAINER}",
            "-b",
        ]

    def boot(self) -> float:
        t0 = time.monotonic()
        for cg in self.cgroups:
            cg.mkdir()
        procs = [cg / "cgroup.procs" for cg in self.cgroups]

        def into_cgroup() -> None:  # runs in the child, before exec
            for p in procs:
                with open(p, "w") as f:
                    f.write("0")

        self._shared_lock = cache_lock(exclusive=False)
        self._shared_lock.__enter__()
        console = open(self.console, "wb")
        try:
            self.nspawn = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                           stdout=console, stderr=subprocess.STDOUT,
                                           preexec_fn=into_cgroup)
        finally:
            console.close()
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise MachineError(f"systemd-nspawn exited with {self.nspawn.returncode}:\n"
                                   + self.console_tail())
            if self.leader is None:
                self.leader = self._find_leader()
            if self.leader is not None:
                r = self.run("systemctl is-system-running", timeout=10, check=False)
                state = r.out.strip()
                if state in ("running", "degraded"):
                    if state == "degraded":
                        failed = self.run("systemctl --failed --no-legend", check=False)
                        self.log(f"container booted degraded: {failed.out.strip()}")
                    return time.monotonic() - t0
            time.sleep(0.2)
        raise MachineError(f"the container did not finish booting in {BOOT_TIMEOUT:.0f} s:\n"
                           + self.console_tail())

    def _find_leader(self) -> int | None:
        assert self.nspawn is not None
        ppid = str(self.nspawn.pid)
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[1] == ppid:
                return int(d.name)
        return None

    def console_tail(self, n: int = 4000) -> str:
        try:
            return self.console.read_text(errors="replace")[-n:]
        except OSError:
            return "(no console output)"

    # -- commands inside --------------------------------------------------------------------
    def run(self, cmd: str, timeout: float = 60, check: bool = True,
            input: str | None = None) -> Result:
        """``sh -c cmd`` inside every namespace of the container, clean environment."""
        if self.leader is None:
            raise MachineError("the container is not running")
        argv = ["nsenter", "-t", str(self.leader), "-a",
                "/usr/bin/env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "HOME=/root",
                "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "TERM=dumb",
                "/bin/sh", "-c", cmd]
        try:
            p = subprocess.run(argv, input=input if input is not None else "",
                               capture_output=True, text=True, timeout=timeout)
            r = Result(p.returncode, p.stdout, p.stderr, cmd)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
            r = Result(-1, out, f"timed out after {timeout} s", cmd)
        if check and not r.ok:
            raise MachineError(str(r))
        return r

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run(f"mkdir -p \"$(dirname '{path}')\" && cat > '{path}' && chmod {mode} '{path}'",
                 input=text)

    def wait_for(self, what: str, pred: Callable[[], bool], timeout: float,
                 interval: float = 0.2) -> float:
        t0 = time.monotonic()
        while True:
            if pred():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)

    def network_state(self) -> dict[str, str]:
        """Qdiscs and links of the container's network namespace (where the daemon would add
        its qdiscs and ifb devices)."""
        return {
            "qdiscs": self.run("tc qdisc show").out,
            "links": self.run("ip -o link show | sed 's/^[0-9]*: //'").out,
        }

    # -- teardown ---------------------------------------------------------------------------
    def poweroff(self, timeout: float = 30.0) -> list[str]:
        problems: list[str] = []
        p = self.nspawn
        if p is None:
            return problems
        if p.poll() is None and self.leader is not None:
            self.run("systemctl --no-block poweroff", timeout=10, check=False)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout)
        if p.poll() is None:
            problems.append("the container did not power off; SIGTERM to systemd-nspawn")
            p.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(15)
        if p.poll() is None:
            problems.append("systemd-nspawn ignored SIGTERM; SIGKILL to the container")
            if self.leader is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGKILL)
            p.kill()
            p.wait(15)
        return problems

    def teardown(self) -> list[str]:
        """Everything goes, whatever happened; returns what needed force or is left."""
        problems = self.poweroff()
        for cg in self.cgroups:
            problems += remove_cgroup_tree(cg)
        if self._shared_lock is not None:
            self._shared_lock.__exit__(None, None, None)
            self._shared_lock = None
        if not self._had_nspawn_run_dir:
            # nspawn creates /run/systemd/nspawn/{locks,propagate} and leaves them empty
            run_dir = Path("/run/systemd/nspawn")
            for d in (run_dir / "locks", run_dir / "propagate", run_dir):
                with contextlib.suppress(OSError):
                    d.rmdir()
        shutil.rmtree(self.workdir, ignore_errors=True)
        shutil.rmtree(self.source, ignore_errors=True)
        self.leader = None
        return problems

    def _snapshot(self) -> dict[str, set[str]]:
        return host_snapshot((str(self.tree), str(self.workdir), str(self.source)))

    def leftovers(self, settle: float = 5.0) -> list[str]:
        """What the container left on the host (given ``settle`` seconds to go by itself)."""
        deadline = time.monotonic() + settle
        while True:
            out = self._leftovers()
            if not out or time.monotonic() > deadline:
                return out
            time.sleep(0.2)

    def _leftovers(self) -> list[str]:
        after = self._snapshot()
        out = []
        for key, now in after.items():
            new = now - self.before.get(key, set())
            if new:
                out.append(f"{key}: {sorted(new)}")
        for path in (self.workdir, self.source):
            if path.exists():
                out.append(f"not removed: {path}")
        if self.nspawn is not None and self.nspawn.poll() is None:
            out.append(f"systemd-nspawn still running: pid {self.nspawn.pid}")
        return out


# ---- what the tests need around the machine ------------------------------------------------

def cannot_run_containers() -> str | None:
    if os.geteuid() != 0:
        return "booting a container needs root"
    p = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--net", "--uts", "--ipc",
                        "--cgroup", "true"], capture_output=True, text=True)
    if p.returncode != 0:
        return f"this machine refuses new namespaces: {p.stderr.strip()}"
    return None


def install(m: Machine) -> None:
    """As the README says: make install (PREFIX=/usr/local), then daemon-reload and
    reload dbus.  No compiler in the tree: make must not try to rebuild the object."""
    clang = m.run("command -v clang", check=False)
    assert not clang.ok, "the container tree must not have clang (the object ships prebuilt)"
    # pip finds what Debian lacks in the wheels fetched on the host (no network in here)
    r = m.run(f"cd {SRC_IN_CONTAINER} && PIP_NO_INDEX=1 PIP_FIND_LINKS=/{WHEELS} make install",
              timeout=300, check=False)
    assert r.ok, f"make install failed inside the container:\n{r}"
    assert "CLANG" not in r.out, f"make install tried to rebuild the BPF object:\n{r}"
    for path in ("/usr/local/bin/chadthrottled", "/usr/local/bin/chadthrottlectl",
                 "/usr/local/lib/systemd/system/chadthrottled.service",
                 "/usr/share/dbus-1/system-services/org.chadthrottle.Throttle1.service",
                 "/usr/share/dbus-1/system.d/org.chadthrottle.Throttle1.conf"):
        assert m.run(f"test -e {path}", check=False).ok, f"make install did not install {path}"
    m.run("systemctl daemon-reload && systemctl reload dbus")
