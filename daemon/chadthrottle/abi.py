"""ctypes mirror of bpf/throttle.h (the kernel <-> user ABI).

tests/unit/test_abi.py compiles nothing: it parses the _Static_assert sizes out of the
header and compares them with these Structures, field by field order included.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int64, c_uint32, c_uint64

DIR_DOWNLOAD = 0
DIR_UPLOAD = 1
DIRS = 2
MAX_LEVELS = 16

MAX_LIMITS = 16384
MAX_MEMBERS = 65536
MAX_UNITS = 1024
MAX_TRAFFIC = 16384


class Bucket(ctypes.Structure):
    _fields_ = [
        ("rate", c_uint64),
        ("burst", c_uint64),
        ("tokens", c_int64),
        ("last_ns", c_uint64),
        ("passed_bytes", c_uint64),
        ("passed_packets", c_uint64),
        ("dropped_bytes", c_uint64),
        ("dropped_packets", c_uint64),
        ("calls", c_uint64),
    ]


class Limit(ctypes.Structure):
    _fields_ = [
        ("lock", c_uint32),
        ("_pad0", c_uint32),
        ("dir", Bucket * DIRS),
    ]


class SkTag(ctypes.Structure):
    _fields_ = [
        ("tgid", c_uint32),
        ("budget", c_uint32),
        ("gen", c_uint64),
    ]


class Traffic(ctypes.Structure):
    _fields_ = [
        ("bytes", c_uint64 * DIRS),
        ("packets", c_uint64 * DIRS),
    ]


class Config(ctypes.Structure):
    _fields_ = [
        ("unit_levels", c_uint64),
        ("member_gen", c_uint64),
    ]


class Global(ctypes.Structure):
    _fields_ = [
        ("calls", c_uint64 * DIRS),
        ("untagged", c_uint64 * DIRS),
        ("dropped", c_uint64 * DIRS),
    ]


# name in bpf/throttle.h -> mirror
STRUCTS = {
    "ct_bucket": Bucket,
    "ct_limit": Limit,
    "ct_sk_tag": SkTag,
    "ct_traffic": Traffic,
    "ct_config": Config,
    "ct_global": Global,
}
