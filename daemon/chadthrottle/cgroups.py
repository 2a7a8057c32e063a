"""cgroup2 facts: where it is mounted, which cgroup a process is in, which *stable parent*
the programs attach to, and the set of attached parents (never an ancestor and a
descendant at once: a packet must be counted and charged once).

Pure path logic takes plain strings ("" or "/" is the cgroup2 root, "a.slice/b.service" a
path relative to the mount) so it can be unit-tested on a fake tree.
"""

from __future__ import annotations

import os
import platform
import stat
from collections.abc import Iterable
from pathlib import Path

from .errors import NoSuchProcess, NoSuchUnit, Unsupported

TRANSIENT_SUFFIX = ".scope"
UNIT_SUFFIXES = (".service", ".scope", ".slice", ".socket", ".mount", ".swap")


# ---- discovery ------------------------------------------------------------------------------

def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, fs type) of every line of /proc/self/mountinfo."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        fstype = right.split()[0] if right.split() else ""
        if len(fields) >= 5:
            mounts.append((fields[4].replace("\\040", " "), fstype))
    return mounts


def _mountinfo() -> str:
    """/proc/self/mountinfo as text.  Any user may mount FUSE at a path of its choosing,
    bytes that are not UTF-8 included: they are kept as the file system's own (fsdecode)."""
    return os.fsdecode(Path("/proc/self/mountinfo").read_bytes())


def cgroup2_mount(mountinfo: str | None = None) -> Path:
    """The cgroup2 mount point (/sys/fs/cgroup/unified on hybrid systems, /sys/fs/cgroup on
    unified ones).  Raises Unsupported when there is none."""
    if mountinfo is None:
        mountinfo = _mountinfo()
    for point, fstype in parse_mountinfo(mountinfo):
        if fstype == "cgroup2":
            return Path(point)
    raise Unsupported("no cgroup2 file system is mounted (mount -t cgroup2 none /sys/fs/cgroup)")


def check_kernel(mountinfo: str | None = None, release: str | None = None,
                 btf: Path = Path("/sys/kernel/btf/vmlinux")) -> None:
    """Raise Unsupported, saying what is missing, when this kernel cannot serve."""
    if not btf.exists():
        raise Unsupported(f"kernel BTF is missing ({btf}); a kernel built with "
                          "CONFIG_DEBUG_INFO_BTF=y is required")
    if mountinfo is None:
        mountinfo = _mountinfo()
    cgroup2_mount(mountinfo)
    release = release or platform.release()
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return
    if (major, minor) < (5, 15):
        v1 = {opt for point, fstype in parse_mountinfo(mountinfo) if fstype == "cgroup"
              for opt in Path(point).name.split(",")}
        used = sorted(v1 & {"net_cls", "net_prio"})
        if used:
            raise Unsupported(
                f"kernel {release} disables cgroup2 socket matching when the cgroup v1 "
                f"controller(s) {', '.join(used)} are mounted; unmount them or use kernel >= 5.15")


# ---- paths ----------------------------------------------------------------------------------

def norm(rel: str) -> str:
    """Canonical relative form: '' for the root, 'a/b' otherwise."""
    return "/".join(p for p in rel.split("/") if p and p != ".")


def display(rel: str) -> str:
    return "/" + norm(rel)


def is_ancestor_or_self(anc: str, path: str) -> bool:
    a, p = norm(anc), norm(path)
    return a == "" or p == a or p.startswith(a + "/")


def stable_parent(rel: str) -> str:
    """Walk up from a process's cgroup past transient *.scope components: the nearest
    enclosing cgroup that is not a scope (a *.service, a *.slice, any other directory) or
    the root.  user.slice/user-1000.slice/user@1000.service/tmux-spawn-1.scope ->
    user.slice/user-1000.slice/user@1000.service."""
    parts = norm(rel).split("/") if norm(rel) else []
    while parts and parts[-1].endswith(TRANSIENT_SUFFIX):
        parts.pop()
    return "/".join(parts)


def plan_attach(attached: Iterable[str], parent: str) -> tuple[str | None, list[str]]:
    """Where to attach so that `parent` is covered exactly once.

    Returns (path to attach or None when an attached ancestor already covers it, attached
    descendants to detach once the new attachment is in place)."""
    attached = [norm(a) for a in attached]
    parent = norm(parent)
    if any(is_ancestor_or_self(a, parent) for a in attached):
        return None, []
    return parent, [a for a in attached if is_ancestor_or_self(parent, a)]


def unit_of(rel: str) -> str:
    """The innermost systemd unit a cgroup path belongs to ("" when none)."""
    for part in reversed(norm(rel).split("/")):
        if part.endswith(UNIT_SUFFIXES):
            return part
    return ""


def level(rel: str) -> int:
    """Depth below the root: root 0, 'a' 1, 'a/b' 2 (bpf_skb_ancestor_cgroup_id's level)."""
    r = norm(rel)
    return 0 if not r else r.count("/") + 1


# ---- names of units and cgroups (bounded before anything else looks at them) ----------------

#: the kernel's limits: a path (with its terminating NUL) and one path component, in bytes
PATH_MAX = 4096
NAME_MAX = 255
SHOWN_CHARS = 80


def shown(name: object) -> str:
    """A name for an error message: its repr, cut to SHOWN_CHARS characters."""
    if not isinstance(name, str):
        return repr(name)
    if len(name) <= SHOWN_CHARS:
        return repr(name)
    return f"{name[:SHOWN_CHARS]!r}… ({len(name)} characters)"


def check_unit_name(unit_or_cgroup: object) -> str:
    """The stripped name, or NoSuchUnit when no cgroup could ever have it: empty, a NUL, a
    path longer than PATH_MAX or a component longer than NAME_MAX bytes.  Linear time."""
    if not isinstance(unit_or_cgroup, str):
        raise NoSuchUnit(f"no such unit or cgroup: {shown(unit_or_cgroup)}")
    if len(unit_or_cgroup) >= PATH_MAX:  # every character is at least one byte
        raise NoSuchUnit(f"no such unit or cgroup: {shown(unit_or_cgroup)} is longer than "
                         f"PATH_MAX ({PATH_MAX} bytes)")
    name = unit_or_cgroup.strip()
    if not name or "\0" in name:
        raise NoSuchUnit(f"no such unit or cgroup: {shown(unit_or_cgroup)}")
    raw = name.encode("utf-8", "surrogatepass")
    if len(raw) >= PATH_MAX:
        raise NoSuchUnit(f"no such unit or cgroup: {shown(unit_or_cgroup)} is longer than "
                         f"PATH_MAX ({PATH_MAX} bytes)")
    if any(len(comp) > NAME_MAX for comp in raw.split(b"/")):
        raise NoSuchUnit(f"no such unit or cgroup: {shown(unit_or_cgroup)} has a component "
                         f"longer than NAME_MAX ({NAME_MAX} bytes)")
    return name


# ---- the live system ------------------------------------------------------------------------

class Cgroups:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root else cgroup2_mount()

    def abspath(self, rel: str) -> Path:
        return self.root / norm(rel) if norm(rel) else self.root

    def of_pid(self, pid: int) -> str:
        """The cgroup2 path (relative) of a process."""
        try:
            # a cgroup's name may hold any byte (whoever may create one chose it)
            text = Path(f"/proc/{pid}/cgroup").read_bytes().decode("utf-8", "replace")
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise NoSuchProcess(f"no process {pid}") from exc
        for line in text.splitlines():
            if line.startswith("0::"):
                return norm(line[3:])
        raise Unsupported(f"process {pid} has no cgroup2 membership (cgroup v1 only system?)")

    def cgroup_id(self, rel: str) -> int:
        """The kernel's cgroup id: the inode number of the cgroup2 directory."""
        return os.stat(self.abspath(rel)).st_ino

    def _is_cgroup(self, rel: str) -> bool:
        """True when ``rel`` (already normalized, no '..') is a directory of the cgroup2
        file system itself (the same device as the mount: never another mount below it)."""
        try:
            root = os.stat(self.root)
            st = os.stat(self.abspath(rel), follow_symlinks=False)
        except (OSError, ValueError):  # ENAMETOOLONG, ELOOP, EACCES, ...: not a cgroup
            return False
        return stat.S_ISDIR(st.st_mode) and st.st_dev == root.st_dev

    def resolve(self, unit_or_cgroup: str) -> str:
        """A systemd unit name ('firefox.scope', 'foo.service') or a path relative to the
        cgroup2 mount -> the relative path of an existing cgroup.  Never escapes the mount.

        Linear in the length of the name, which is bounded first (PATH_MAX, NAME_MAX):
        '..' is resolved lexically (cgroupfs has no symlinks) and any '..' above the mount
        is refused; the result is one stat() of a directory on the cgroup2 device."""
        name = check_unit_name(unit_or_cgroup)
        if "/" in name:
            parts: list[str] = []
            for comp in name.split("/"):
                if comp in ("", "."):
                    continue
                if comp == "..":
                    if not parts:
                        raise NoSuchUnit(f"{shown(unit_or_cgroup)} is outside the cgroup2 "
                                         f"mount {self.root}")
                    parts.pop()
                    continue
                parts.append(comp)
            rel = "/".join(parts)
            if not self._is_cgroup(rel):
                raise NoSuchUnit(f"no such cgroup: {shown(unit_or_cgroup)}")
            return rel
        if name in (".", ".."):
            raise NoSuchUnit(f"no such unit or cgroup: {shown(unit_or_cgroup)}")
        if self._is_cgroup(name):
            return name
        # breadth-first: unit cgroups sit a few levels down (user.slice/.../app.slice/x.scope)
        frontier = [self.root]
        for _ in range(CT_SEARCH_DEPTH):
            nxt = []
            for d in frontier:
                try:
                    entries = [e for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
                except OSError:
                    continue
                for e in entries:
                    if e.name == name:
                        return norm(str(Path(e.path).relative_to(self.root)))
                    nxt.append(Path(e.path))
            frontier = nxt
            if not frontier:
                break
        raise NoSuchUnit(f"no unit or cgroup named {shown(unit_or_cgroup)} below {self.root}")


CT_SEARCH_DEPTH = 8


def child_with_id(root: Path, parent_rel: str, cgid: int) -> str | None:
    """The path of the cgroup directly below parent_rel whose id (inode) is cgid."""
    base = root / norm(parent_rel) if norm(parent_rel) else root
    try:
        for e in os.scandir(base):
            if e.is_dir(follow_symlinks=False) and e.inode() == cgid:
                return norm(str(Path(e.path).relative_to(root)))
    except OSError:
        return None
    return None
