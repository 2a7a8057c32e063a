"""Lifecycle of the one BPF object: open, load, find maps and programs by ELF name, attach,
detach, close (links first, then the object).

Attachments are bpf_links owned by this process: if the daemon dies, the kernel drops them
and traffic flows unlimited (fail-open) instead of staying throttled by an orphan program.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import libbpf

log = logging.getLogger(__name__)


def default_object_path() -> Path:
    """CHADTHROTTLE_BPF_OBJECT, else the object built into the package's data folder."""
    env = os.environ.get("CHADTHROTTLE_BPF_OBJECT")
    if env:
        return Path(env)
    return Path(str(resources.files("chadthrottle") / "data" / "throttle.bpf.o"))


@dataclass
class Link:
    """One attachment; destroy() detaches it."""

    ptr: int
    program: str
    target: str  # cgroup path or "tracepoint"

    def destroy(self) -> None:
        if self.ptr:
            ret = libbpf.lib().bpf_link__destroy(self.ptr)
            self.ptr = 0
            libbpf.check(ret, f"detach {self.program} from {self.target}")


class BpfObject:
    def __init__(self, path: Path | str | None = None, *,
                 map_sizes: dict[str, int] | None = None):
        """map_sizes: max_entries of maps (by name) to set before loading."""
        self.path = Path(path) if path else default_object_path()
        self.map_sizes = dict(map_sizes or {})
        self._obj: int = 0
        self._links: list[Link] = []
        self._iter_links: dict[str, Link] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self) -> BpfObject:
        if self._obj:
            return self
        if not self.path.is_file():
            raise FileNotFoundError(
                errno.ENOENT, f"BPF object not found: {self.path} (run `make build`)"
            )
        lb = libbpf.lib()
        obj = libbpf.check_ptr(lb.bpf_object__open_file(str(self.path).encode(), None),
                               f"open {self.path}")
        try:
            for name, size in self.map_sizes.items():
                m = libbpf.check_ptr(lb.bpf_object__find_map_by_name(obj, name.encode()),
                                     f"map {name}")
                libbpf.check(lb.bpf_map__set_max_entries(m, size),
                             f"max_entries {size} of map {name}")
        except BaseException:
            lb.bpf_object__close(obj)
            raise
        ret = lb.bpf_object__load(obj)
        if ret < 0:
            lb.bpf_object__close(obj)
            libbpf.check(ret, f"load {self.path.name} (verifier log above)")
        self._obj = obj
        log.debug("loaded %s", self.path)
        return self

    def close(self) -> None:
        """Detach every link (reverse order of attachment), then free the object."""
        first_error: OSError | None = None
        self._iter_links.clear()
        while self._links:
            link = self._links.pop()
            try:
                link.destroy()
            except OSError as exc:
                first_error = first_error or exc
        if self._obj:
            libbpf.lib().bpf_object__close(self._obj)
            self._obj = 0
        if first_error:
            raise first_error

    def __enter__(self) -> BpfObject:
        return self.load()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def loaded(self) -> bool:
        return bool(self._obj)

    # -- lookup by ELF name ------------------------------------------------------------------
    def _need(self) -> int:
        if not self._obj:
            raise RuntimeError("BPF object is not loaded")
        return self._obj

    def max_entries(self, name: str) -> int:
        lb = libbpf.lib()
        m = libbpf.check_ptr(lb.bpf_object__find_map_by_name(self._need(), name.encode()),
                             f"map {name}")
        return int(lb.bpf_map__max_entries(m))

    def map_fd(self, name: str) -> int:
        lb = libbpf.lib()
        m = libbpf.check_ptr(lb.bpf_object__find_map_by_name(self._need(), name.encode()),
                             f"map {name}")
        return libbpf.check(lb.bpf_map__fd(m), f"fd of map {name}")

    def _program(self, name: str) -> int:
        return libbpf.check_ptr(
            libbpf.lib().bpf_object__find_program_by_name(self._need(), name.encode()),
            f"program {name}",
        )

    def program_fd(self, name: str) -> int:
        return libbpf.check(libbpf.lib().bpf_program__fd(self._program(name)), f"fd of {name}")

    # -- attach / detach ---------------------------------------------------------------------
    def attach_cgroup(self, program: str, cgroup_path: str | Path) -> Link:
        """Attach a cgroup program through a bpf_link (always multi: coexists with others)."""
        prog = self._program(program)
        fd = os.open(str(cgroup_path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            ptr = libbpf.check_ptr(libbpf.lib().bpf_program__attach_cgroup(prog, fd),
                                   f"attach {program} to {cgroup_path}")
        finally:
            os.close(fd)
        link = Link(ptr, program, str(cgroup_path))
        self._links.append(link)
        return link

    def attach_tracing(self, program: str) -> Link:
        ptr = libbpf.check_ptr(libbpf.lib().bpf_program__attach(self._program(program)),
                               f"attach {program}")
        link = Link(ptr, program, "tracepoint")
        self._links.append(link)
        return link

    def detach(self, link: Link) -> None:
        if link in self._links:
            self._links.remove(link)
        link.destroy()

    # -- iterators ---------------------------------------------------------------------------
    def run_iter(self, program: str, pid_fd: int | None = None) -> bytes:
        """Run a BPF iterator program once and return what it wrote (bpf_seq_write).

        pid_fd: visit only that process (exact identity, no pid numbers).  Without it every
        task is visited; that link is kept and reused."""
        lb = libbpf.lib()
        if pid_fd is None:
            link = self._iter_links.get(program)
            if link is None:
                ptr = libbpf.check_ptr(lb.bpf_program__attach_iter(self._program(program), None),
                                       f"attach iterator {program}")
                link = self._iter_links[program] = Link(ptr, program, "iterator")
                self._links.append(link)
            return _read_iter(link.ptr, program)
        info = libbpf.IterTaskInfo(0, 0, pid_fd, 0)
        opts = libbpf.IterAttachOpts(ctypes.sizeof(libbpf.IterAttachOpts),
                                     ctypes.addressof(info), ctypes.sizeof(info))
        ptr = libbpf.check_ptr(lb.bpf_program__attach_iter(self._program(program),
                                                           ctypes.byref(opts)),
                               f"attach iterator {program}")
        try:
            return _read_iter(ptr, program)
        finally:
            lb.bpf_link__destroy(ptr)

    def ring_buffer(self, map_name: str, on_record) -> RingBuffer:
        """A consumer of a BPF ring buffer map; on_record(bytes) is called per record."""
        return RingBuffer(self.map_fd(map_name), on_record)


def _read_iter(link_ptr: int, program: str) -> bytes:
    lb = libbpf.lib()
    fd = libbpf.check(lb.bpf_iter_create(libbpf.check(lb.bpf_link__fd(link_ptr),
                                                      f"fd of {program}")),
                      f"create iterator {program}")
    chunks = []
    try:
        while True:
            b = os.read(fd, 1 << 16)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(fd)
    return b"".join(chunks)


class RingBuffer:
    """libbpf's ring_buffer over one map.  ``fd`` (an epoll fd) turns readable when records
    wait; ``consume()`` hands each to the callback and returns how many there were."""

    def __init__(self, map_fd: int, on_record) -> None:
        self._on_record = on_record
        self._error: BaseException | None = None

        def _cb(_ctx, data, size):
            try:
                self._on_record(ctypes.string_at(data, size))
            except BaseException as exc:  # never let an exception cross into C
                self._error = self._error or exc
            return 0

        self._cb = libbpf.RING_SAMPLE_FN(_cb)
        self._ptr = libbpf.check_ptr(libbpf.lib().ring_buffer__new(map_fd, self._cb, None, None),
                                     "ring buffer")

    @property
    def fd(self) -> int:
        return libbpf.check(libbpf.lib().ring_buffer__epoll_fd(self._ptr), "ring buffer fd")

    def consume(self) -> int:
        n = libbpf.check(libbpf.lib().ring_buffer__consume(self._ptr), "ring buffer consume")
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return n

    def close(self) -> None:
        if self._ptr:
            libbpf.lib().ring_buffer__free(self._ptr)
            self._ptr = 0
