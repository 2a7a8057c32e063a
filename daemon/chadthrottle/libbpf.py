"""ctypes binding over the system libbpf (libbpf.so.1).

This module owns the CDLL.  Every function it uses is declared once in PROTOTYPES with its
restype and argtypes (tests/unit/test_libbpf_prototypes.py checks that nothing is called
undeclared).  Failures become OSError: libbpf >= 1.0 returns -errno from int functions and
NULL + errno from pointer functions.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno as _errno
import logging
import os
from ctypes import CFUNCTYPE, c_char_p, c_int, c_size_t, c_uint32, c_uint64, c_void_p

log = logging.getLogger(__name__)

# Map update flags (uapi/linux/bpf.h)
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_LOCK = 4

# Opaque libbpf types
bpf_object_p = c_void_p
bpf_map_p = c_void_p
bpf_program_p = c_void_p
bpf_link_p = c_void_p

bpf_ring_buffer_p = c_void_p

# int (*libbpf_print_fn_t)(enum libbpf_print_level level, const char *, va_list ap)
PRINT_FN = CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
RING_SAMPLE_FN = CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)

PROTOTYPES: dict[str, tuple[object, list[object]]] = {
    "libbpf_major_version": (c_uint32, []),
    "libbpf_minor_version": (c_uint32, []),
    "libbpf_set_print": (c_void_p, [PRINT_FN]),
    "libbpf_num_possible_cpus": (c_int, []),
    "bpf_object__open_file": (bpf_object_p, [c_char_p, c_void_p]),
    "bpf_object__load": (c_int, [bpf_object_p]),
    "bpf_object__close": (None, [bpf_object_p]),
    "bpf_object__find_map_by_name": (bpf_map_p, [bpf_object_p, c_char_p]),
    "bpf_object__find_program_by_name": (bpf_program_p, [bpf_object_p, c_char_p]),
    "bpf_map__fd": (c_int, [bpf_map_p]),
    "bpf_map__set_max_entries": (c_int, [bpf_map_p, c_uint32]),
    "bpf_map__max_entries": (c_uint32, [bpf_map_p]),
    "bpf_map__value_size": (c_uint32, [bpf_map_p]),
    "bpf_map__key_size": (c_uint32, [bpf_map_p]),
    "bpf_program__fd": (c_int, [bpf_program_p]),
    "bpf_program__attach_cgroup": (bpf_link_p, [bpf_program_p, c_int]),
    "bpf_program__attach": (bpf_link_p, [bpf_program_p]),
    "bpf_link__destroy": (c_int, [bpf_link_p]),
    "bpf_link__fd": (c_int, [bpf_link_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_lookup_elem_flags": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_enable_stats": (c_int, [c_int]),
    "bpf_map_lookup_batch": (c_int, [c_int, c_void_p, c_void_p, c_void_p, c_void_p,
                                     ctypes.POINTER(c_uint32), c_void_p]),
    "bpf_map_lookup_and_delete_batch": (c_int, [c_int, c_void_p, c_void_p, c_void_p,
                                                c_void_p, ctypes.POINTER(c_uint32), c_void_p]),
    "bpf_program__attach_iter": (bpf_link_p, [bpf_program_p, c_void_p]),
    "bpf_iter_create": (c_int, [c_int]),
    "ring_buffer__new": (bpf_ring_buffer_p, [c_int, RING_SAMPLE_FN, c_void_p, c_void_p]),
    "ring_buffer__consume": (c_int, [bpf_ring_buffer_p]),
    "ring_buffer__epoll_fd": (c_int, [bpf_ring_buffer_p]),
    "ring_buffer__free": (None, [bpf_ring_buffer_p]),
    "bpf_tc_hook_create": (c_int, [c_void_p]),
    "bpf_tc_hook_destroy": (c_int, [c_void_p]),
    "bpf_tc_attach": (c_int, [c_void_p, c_void_p]),
    "bpf_tc_detach": (c_int, [c_void_p, c_void_p]),
    "bpf_tc_query": (c_int, [c_void_p, c_void_p]),
}


class IterTaskInfo(ctypes.Structure):
    """union bpf_iter_link_info, its task member (uapi/linux/bpf.h): one process by pidfd."""

    _fields_ = [("tid", c_uint32), ("pid", c_uint32), ("pid_fd", c_uint32),
                ("_pad", c_uint32)]


class IterAttachOpts(ctypes.Structure):
    """struct bpf_iter_attach_opts (libbpf/libbpf.h)."""

    _fields_ = [("sz", c_size_t), ("link_info", c_void_p), ("link_info_len", c_uint32)]


class BatchOpts(ctypes.Structure):
    """struct bpf_map_batch_opts (libbpf/bpf.h)."""

    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]

# enum bpf_tc_attach_point, enum bpf_tc_flags (libbpf/libbpf.h)
BPF_TC_INGRESS = 1 << 0
BPF_TC_EGRESS = 1 << 1
BPF_TC_F_REPLACE = 1 << 0


class TcHook(ctypes.Structure):
    """struct bpf_tc_hook (libbpf/libbpf.h): a device's clsact qdisc, one side of it, or both
    (destroying both removes the qdisc)."""

    _fields_ = [("sz", c_size_t), ("ifindex", c_int), ("attach_point", c_int),
                ("parent", c_uint32)]


class TcOpts(ctypes.Structure):
    """struct bpf_tc_opts (libbpf/libbpf.h): one cls_bpf filter (direct action) by handle and
    priority."""

    _fields_ = [("sz", c_size_t), ("prog_fd", c_int), ("flags", c_uint32),
                ("prog_id", c_uint32), ("handle", c_uint32), ("priority", c_uint32)]


_LIBC_PROTOTYPES: dict[str, tuple[object, list[object]]] = {
    "vsnprintf": (c_int, [c_char_p, c_size_t, c_char_p, c_void_p]),
}

#: libbpf messages are formatted into one buffer of this size; longer ones keep their end
PRINT_BUFFER = 8 << 20
PRINT_SMALL = 4096
PRINT_KEEP = 16 << 10

_lib: ctypes.CDLL | None = None
_libc: ctypes.CDLL | None = None
_print_cb = None  # keep the callback alive for the life of the process
_expected = 0  # > 0: a failure the caller handles is expected, libbpf's warnings are debug


def _declare(lib: ctypes.CDLL, table: dict[str, tuple[object, list[object]]]) -> None:
    for name, (restype, argtypes) in table.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


def lib() -> ctypes.CDLL:
    """The libbpf CDLL with every prototype declared (loaded once)."""
    global _lib, _libc
    if _lib is None:
        name = os.environ.get("CHADTHROTTLE_LIBBPF") or "libbpf.so.1"
        try:
            handle = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise OSError(_errno.ENOENT, f"cannot load {name} (install libbpf1): {exc}") from exc
        _declare(handle, PROTOTYPES)
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _declare(libc, _LIBC_PROTOTYPES)
        _lib, _libc = handle, libc
        _install_print()
    return _lib


def _install_print() -> None:
    """Route libbpf's messages (verifier logs included) into Python logging."""
    global _print_cb
    levels = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}
    bpflog = logging.getLogger("chadthrottle.libbpf")

    # a verifier log is one message of up to megabytes, and the reason of a rejection is at
    # its end (a va_list cannot be formatted twice to measure it first): warnings get a big
    # buffer, made once when first needed; other messages a small one, and only when their
    # level is logged at all
    small = ctypes.create_string_buffer(PRINT_SMALL)
    big: list = []

    def _cb(level: int, fmt: bytes, va_list: int) -> int:
        try:
            assert _libc is not None
            py_level = levels.get(level, logging.DEBUG)
            if _expected:
                py_level = logging.DEBUG
            if not bpflog.isEnabledFor(py_level):
                return 0
            if py_level >= logging.WARNING:
                if not big:
                    big.append(ctypes.create_string_buffer(PRINT_BUFFER))
                buf = big[0]
            else:
                buf = small
            n = _libc.vsnprintf(buf, len(buf), fmt, va_list)
            text = buf.value.decode(errors="replace").rstrip()
            if len(text) > PRINT_KEEP:
                text = (text[:PRINT_KEEP // 8] + "\n[… verifier log shortened …]\n"
                        + text[-PRINT_KEEP:])
            bpflog.log(py_level, "%s", text)
            return n
        except Exception:  # never let an exception cross into C
            return 0

    _print_cb = PRINT_FN(_cb)
    assert _lib is not None
    _lib.libbpf_set_print(_print_cb)


@contextlib.contextmanager
def expected_errors():
    """While in it, libbpf's own messages (the kernel's reason of a refusal) are logged at
    debug level: the caller expects the call may fail and says what it means itself."""
    global _expected
    _expected += 1
    try:
        yield
    finally:
        _expected -= 1


def version() -> tuple[int, int]:
    lb = lib()
    return int(lb.libbpf_major_version()), int(lb.libbpf_minor_version())


def check(ret: int, what: str) -> int:
    """Turn libbpf's -errno convention into OSError."""
    if ret < 0:
        err = -ret
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def check_ptr(ptr: int | None, what: str) -> int:
    """Pointer-returning libbpf functions give NULL and set errno."""
    if not ptr:
        err = ctypes.get_errno() or _errno.EINVAL
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ptr


# ---- thin typed helpers on map fds ------------------------------------------------------------

def map_update(fd: int, key: ctypes._CData, value: ctypes._CData, flags: int = BPF_ANY) -> None:
    ret = lib().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), flags)
    check(ret, "map update")


def map_lookup(fd: int, key: ctypes._CData, value: ctypes._CData, flags: int = 0) -> bool:
    """Fill value; False when the key is absent."""
    ret = lib().bpf_map_lookup_elem_flags(fd, ctypes.byref(key), ctypes.byref(value), flags)
    if ret == -_errno.ENOENT:
        return False
    check(ret, "map lookup")
    return True


def map_delete(fd: int, key: ctypes._CData) -> bool:
    """False when the key was absent."""
    ret = lib().bpf_map_delete_elem(fd, ctypes.byref(key))
    if ret == -_errno.ENOENT:
        return False
    check(ret, "map delete")
    return True


def map_keys(fd: int, key_type: type) -> list:
    """Every key of a hash map (snapshot; entries may change meanwhile)."""
    keys = []
    cur = None
    nxt = key_type()
    lb = lib()
    while True:
        prev = None if cur is None else ctypes.byref(cur)
        ret = lb.bpf_map_get_next_key(fd, prev, ctypes.byref(nxt))
        if ret == -_errno.ENOENT:
            return keys
        check(ret, "map get_next_key")
        keys.append(nxt.value if hasattr(nxt, "value") else nxt)
        cur = key_type.from_buffer_copy(nxt)


def num_possible_cpus() -> int:
    return check(lib().libbpf_num_possible_cpus(), "num_possible_cpus")


def map_lookup_all(fd: int, key_type: type, value_type: type, capacity: int) -> list:
    """Every (key, value) of a hash map in a few BPF_MAP_LOOKUP_BATCH calls instead of two
    syscalls per entry.  value_type is the whole per-entry value (an array of per-CPU
    values for per-CPU maps).  Falls back to key-by-key where batches are unsupported."""
    chunk = max(1, min(capacity, 4096))
    keys = (key_type * chunk)()
    values = (value_type * chunk)()
    token_in = ctypes.create_string_buffer(16)
    token_out = ctypes.create_string_buffer(16)
    opts = BatchOpts(sz=ctypes.sizeof(BatchOpts))
    out: list = []
    first = True
    lb = lib()
    while True:
        count = c_uint32(chunk)
        ret = lb.bpf_map_lookup_batch(fd, None if first else token_in, token_out, keys, values,
                                      ctypes.byref(count), ctypes.byref(opts))
        n = count.value
        for i in range(n):
            k, v = keys[i], values[i]  # ctypes gives plain ints for simple types
            out.append((k if isinstance(k, int) else key_type.from_buffer_copy(k),
                        v if isinstance(v, int) else value_type.from_buffer_copy(v)))
        if ret == -_errno.ENOENT:
            return out
        if ret in (-_errno.EINVAL, -_errno.ENOTSUP, -_errno.EOPNOTSUPP) and first:
            break  # old kernel: no batch ops for this map type
        check(ret, "map lookup batch")
        ctypes.memmove(token_in, token_out, 16)
        first = False
    out = []
    v = value_type()
    for k in map_keys(fd, key_type):
        if lb.bpf_map_lookup_elem(fd, ctypes.byref(key_type(k)), ctypes.byref(v)) == 0:
            out.append((k, v.value if hasattr(v, "value") else value_type.from_buffer_copy(v)))
    return out


def map_take_all(fd: int, key_type: type, value_type: type, capacity: int) -> list:
    """Every (key, value) of a hash map, removed from it as it is read
    (BPF_MAP_LOOKUP_AND_DELETE_BATCH): what producers added since the last take."""
    chunk = max(1, min(capacity, 4096))
    keys = (key_type * chunk)()
    values = (value_type * chunk)()
    token_in = ctypes.create_string_buffer(16)
    token_out = ctypes.create_string_buffer(16)
    opts = BatchOpts(sz=ctypes.sizeof(BatchOpts))
    out: list = []
    first = True
    lb = lib()
    while True:
        count = c_uint32(chunk)
        ret = lb.bpf_map_lookup_and_delete_batch(fd, None if first else token_in, token_out,
                                                 keys, values, ctypes.byref(count),
                                                 ctypes.byref(opts))
        for i in range(count.value):
            k, v = keys[i], values[i]
            out.append((k if isinstance(k, int) else key_type.from_buffer_copy(k),
                        v if isinstance(v, int) else value_type.from_buffer_copy(v)))
        if ret == -_errno.ENOENT:
            return out
        check(ret, "map lookup-and-delete batch")
        ctypes.memmove(token_in, token_out, 16)
        first = False


# ---- tc: the clsact qdisc of a device and our filter on its ingress --------------------------

def _tc_hook(ifindex: int, attach_point: int) -> TcHook:
    return TcHook(sz=ctypes.sizeof(TcHook), ifindex=ifindex, attach_point=attach_point)


def tc_clsact_create(ifindex: int) -> None:
    """Add a clsact qdisc to the device; OSError EEXIST when its ingress already has a qdisc
    (clsact or ingress: one place for both)."""
    hook = _tc_hook(ifindex, BPF_TC_INGRESS)
    check(lib().bpf_tc_hook_create(ctypes.byref(hook)), "tc clsact create")


def tc_clsact_destroy(ifindex: int) -> None:
    """Remove the device's clsact qdisc with every filter in it."""
    hook = _tc_hook(ifindex, BPF_TC_INGRESS | BPF_TC_EGRESS)
    check(lib().bpf_tc_hook_destroy(ctypes.byref(hook)), "tc clsact destroy")


def tc_attach_ingress(ifindex: int, prog_fd: int, handle: int, priority: int) -> int:
    """Attach a cls_bpf filter (direct action) to the device's ingress; its program id."""
    hook = _tc_hook(ifindex, BPF_TC_INGRESS)
    opts = TcOpts(sz=ctypes.sizeof(TcOpts), prog_fd=prog_fd, handle=handle, priority=priority)
    check(lib().bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)), "tc filter attach")
    return int(opts.prog_id)


def tc_detach_ingress(ifindex: int, handle: int, priority: int) -> None:
    hook = _tc_hook(ifindex, BPF_TC_INGRESS)
    opts = TcOpts(sz=ctypes.sizeof(TcOpts), handle=handle, priority=priority)
    check(lib().bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts)), "tc filter detach")


def tc_query_ingress(ifindex: int, handle: int, priority: int) -> int | None:
    """The program id of the ingress filter with this handle and priority (None: no such
    filter, or no clsact qdisc)."""
    hook = _tc_hook(ifindex, BPF_TC_INGRESS)
    opts = TcOpts(sz=ctypes.sizeof(TcOpts), handle=handle, priority=priority)
    with expected_errors():
        ret = lib().bpf_tc_query(ctypes.byref(hook), ctypes.byref(opts))
    if ret in (-_errno.ENOENT, -_errno.EINVAL):
        return None
    check(ret, "tc filter query")
    return int(opts.prog_id)
