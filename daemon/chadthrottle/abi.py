"""ctypes mirror of bpf/throttle.h (the kernel <-> user ABI).

tests/unit/test_abi.py compiles nothing: it parses the _Static_assert sizes, the field
order and the #define constants out of the header and compares them with this module.
"""

from __future__ import annotations

import ctypes
from ctypes import c_char, c_int64, c_uint32, c_uint64

DIR_DOWNLOAD = 0
DIR_UPLOAD = 1
DIRS = 2
MAX_LEVELS = 16

MAX_LIMITS = 16384
MAX_UNITS = 1024
MAX_TRAFFIC = 16384
MAX_PEERS = 16384
MAX_RULES = 64
MAX_EXE = 8192
MAX_WATCH = 4096
MAX_CLASSES = 16384
MAX_CHECKS = 64
MAX_FILE_SOCKS = 65536
MAX_ACTIVE = 4096
MAX_DEVICES = 256

KERNEL_BID = 1 << 62
COUNTED = 1 << 63
BID_MASK = COUNTED - 1
EPOCH_NS = 100_000_000
FLUSH_PACKETS = 16

LIMIT_CLASS_ASKED = 0x1
TASK_EXPLICIT = 0x1
TASK_ROOT = 0x2
SK_CB = 0x1
SK_PEER_REG = 0x2

ITER_ENROLL = 1
ITER_RELEASE = 2
ITER_CENSUS = 3
ITER_TAG = 4
ITER_CHECK = 5
ITER_UNIT = 6
ITER_SELF = 7
ITER_ORPHANS = 8
ITER_SOCKS = 9

CFG_BUDGETS = 0x1
CFG_EXEC_DIRS = 0x2
CFG_PEERS = 0x4
CFG_QUEUES = 0x8

RULE_ACTIVE = 0x1
RULE_EXE = 0x2
RULE_COMM = 0x4
RULE_UID = 0x8
RULE_UNIT = 0x10
RULE_USER = 0x20
RULE_APP = 0x40

EV_EMPTY = 1
EV_ROOT_EXIT = 2
EV_EXEC = 3
EV_RULE = 4
EV_CLASS = 5
EV_CGROUP_RMDIR = 6
EV_CGROUP_MKDIR = 7
EV_RETAG = 8
EV_FULL = 9
EV_CGROUP_MOVE = 10
EV_PEER = 11
EV_DEVICE = 12

FULL_LIMITS = 1
FULL_TASKS = 2
FULL_PEERS = 3
FULL_TRAFFIC = 4

#: the kernel's "no cap" pacing value and the clamp that releases a window
UNLIMITED_PACE = 0xFFFFFFFF


class Bucket(ctypes.Structure):
    _fields_ = [
        ("rate", c_uint64),
        ("burst", c_uint64),
        ("slack", c_uint64),
        ("tokens", c_int64),
        ("last_ns", c_uint64),
        ("passed_bytes", c_uint64),
        ("passed_packets", c_uint64),
        ("dropped_bytes", c_uint64),
        ("dropped_packets", c_uint64),
        ("calls", c_uint64),
        ("epoch", c_uint64),
        ("active", c_uint32),
        ("counting", c_uint32),
    ]


class Limit(ctypes.Structure):
    _fields_ = [
        ("lock", c_uint32),
        ("flags", c_uint32),
        ("dir", Bucket * DIRS),
        ("members", c_int64),
        ("cfg_gen", c_uint64),
        ("set_gen", c_uint64),
        ("root_tgid", c_uint32),
        ("mss", c_uint32),
        ("rule", c_uint32),
        ("_pad0", c_uint32),
        ("seen_gen", c_uint64),
    ]


class LimitCfg(ctypes.Structure):
    _fields_ = [
        ("rate", c_uint64 * DIRS),
        ("burst", c_uint64 * DIRS),
        ("slack", c_uint64 * DIRS),
        ("gen", c_uint64),
        ("mss", c_uint32),
        ("_pad0", c_uint32),
    ]


class Task(ctypes.Structure):
    _fields_ = [
        ("state", c_uint64),
        ("flags", c_uint32),
        ("rule", c_uint32),
    ]


class SkTag(ctypes.Structure):
    _fields_ = [
        ("budget", c_uint64),
        ("peer_budget", c_uint64),
        ("unit", c_uint64),
        ("seen", c_uint64 * DIRS),
        ("tgid", c_uint32),
        ("flags", c_uint32),
        ("paced", c_uint32),
        ("clamp", c_uint32),
        ("cwnd", c_uint32),
        ("rx", c_uint32),
        ("pend_bytes", c_uint64 * DIRS),
        ("pend_pkts", c_uint32 * DIRS),
    ]


class PeerKey(ctypes.Structure):
    _fields_ = [
        ("family", c_uint32),
        ("ports", c_uint32),
        ("local", c_uint32 * 4),
        ("remote", c_uint32 * 4),
    ]


class Traffic(ctypes.Structure):
    _fields_ = [
        ("bytes", c_uint64 * DIRS),
        ("packets", c_uint64 * DIRS),
    ]


class Config(ctypes.Structure):
    _fields_ = [
        ("unit_levels", c_uint64),
        ("cfg_gen", c_uint64),
        ("iter_budget", c_uint64),
        ("iter_op", c_uint32),
        ("iter_tgid", c_uint32),
        ("daemon_tgid", c_uint32),
        ("nrules", c_uint32),
        ("flags", c_uint32),
        ("iter_arg", c_uint32),
        ("sample_gen", c_uint64),
        ("pid_level", c_uint32),
        ("_pad1", c_uint32),
    ]


class Global(ctypes.Structure):
    _fields_ = [
        ("untagged", c_uint64 * DIRS),
        ("dropped", c_uint64 * DIRS),
        ("paced", c_uint64),
        ("retagged", c_uint64),
        ("full", c_uint64),
        ("events_lost", c_uint64),
        ("queue_grace", c_uint64),
    ]


DEV_PENDING, DEV_QUEUED, DEV_REFUSED = 0, 1, 2
QUEUE_GRACE_NS = 500_000_000


class Device(ctypes.Structure):
    """A device limited downloads arrived on (dl_devices)."""
    _fields_ = [
        ("seen_ns", c_uint64),
        ("state", c_uint32),
        ("ifb", c_uint32),
    ]


class Rule(ctypes.Structure):
    _fields_ = [
        ("flags", c_uint32),
        ("uid", c_uint32),
        ("unit", c_uint64),
        ("app_budget", c_uint64),
        ("unit_level", c_uint32),
        ("mss", c_uint32),
        ("rate", c_uint64 * DIRS),
        ("burst", c_uint64 * DIRS),
        ("slack", c_uint64 * DIRS),
        ("comm", c_char * 16),
    ]


class ExeKey(ctypes.Structure):
    _fields_ = [
        ("ino", c_uint64),
        ("dev", c_uint32),
        ("slot", c_uint32),
    ]


class DirKey(ctypes.Structure):
    _fields_ = [
        ("ino", c_uint64),
        ("dev", c_uint32),
        ("_pad0", c_uint32),
    ]


class Event(ctypes.Structure):
    _fields_ = [
        ("type", c_uint32),
        ("tgid", c_uint32),
        ("budget", c_uint64),
        ("a", c_uint64),
        ("b", c_uint64),
        ("rule", c_uint32),
        ("_pad0", c_uint32),
        ("comm", c_char * 16),
    ]


class MemberRec(ctypes.Structure):
    _fields_ = [
        ("tgid", c_uint32),
        ("flags", c_uint32),
        ("budget", c_uint64),
    ]


class SelfRec(ctypes.Structure):
    _fields_ = [
        ("pid_level", c_uint32),
        ("cgroup_level", c_uint32),
    ]


class FileSock(ctypes.Structure):
    _fields_ = [
        ("id", c_uint64),
        ("leaving", c_uint64),
        ("tgid", c_uint32),
        ("op", c_uint32),
    ]


class Check(ctypes.Structure):
    _fields_ = [
        ("received", c_uint64),
        ("acked", c_uint64),
        ("sockets", c_uint64),
    ]


# name in bpf/throttle.h -> mirror
STRUCTS = {
    "ct_bucket": Bucket,
    "ct_limit": Limit,
    "ct_limit_cfg": LimitCfg,
    "ct_task": Task,
    "ct_sk_tag": SkTag,
    "ct_peer_key": PeerKey,
    "ct_traffic": Traffic,
    "ct_config": Config,
    "ct_global": Global,
    "ct_rule": Rule,
    "ct_exe_key": ExeKey,
    "ct_dir_key": DirKey,
    "ct_event": Event,
    "ct_member_rec": MemberRec,
    "ct_check": Check,
    "ct_file_sock": FileSock,
    "ct_self_rec": SelfRec,
    "ct_device": Device,
}

#: every CT_* constant of the header that code here relies on: name -> value (a test checks)
CONSTANTS = {
    "CT_DIR_DOWNLOAD": DIR_DOWNLOAD, "CT_DIR_UPLOAD": DIR_UPLOAD, "CT_DIRS": DIRS,
    "CT_MAX_LEVELS": MAX_LEVELS, "CT_MAX_LIMITS": MAX_LIMITS, "CT_MAX_UNITS": MAX_UNITS,
    "CT_MAX_TRAFFIC": MAX_TRAFFIC, "CT_MAX_PEERS": MAX_PEERS, "CT_MAX_RULES": MAX_RULES,
    "CT_MAX_EXE": MAX_EXE, "CT_MAX_WATCH": MAX_WATCH, "CT_MAX_CLASSES": MAX_CLASSES,
    "CT_FLUSH_PACKETS": FLUSH_PACKETS, "CT_MAX_CHECKS": MAX_CHECKS, "CT_MAX_ACTIVE": MAX_ACTIVE,
    "CT_MAX_DEVICES": MAX_DEVICES,
    "CT_LIMIT_CLASS_ASKED": LIMIT_CLASS_ASKED, "CT_TASK_EXPLICIT": TASK_EXPLICIT,
    "CT_TASK_ROOT": TASK_ROOT, "CT_SK_CB": SK_CB, "CT_SK_PEER_REG": SK_PEER_REG,
    "CT_ITER_ENROLL": ITER_ENROLL, "CT_ITER_RELEASE": ITER_RELEASE,
    "CT_ITER_CENSUS": ITER_CENSUS, "CT_ITER_TAG": ITER_TAG, "CT_ITER_CHECK": ITER_CHECK,
    "CT_ITER_UNIT": ITER_UNIT, "CT_ITER_SELF": ITER_SELF, "CT_ITER_ORPHANS": ITER_ORPHANS,
    "CT_ITER_SOCKS": ITER_SOCKS, "CT_MAX_FILE_SOCKS": MAX_FILE_SOCKS,
    "CT_CFG_BUDGETS": CFG_BUDGETS,
    "CT_CFG_EXEC_DIRS": CFG_EXEC_DIRS,
    "CT_CFG_PEERS": CFG_PEERS, "CT_CFG_QUEUES": CFG_QUEUES, "CT_DEV_PENDING": DEV_PENDING,
    "CT_DEV_QUEUED": DEV_QUEUED, "CT_DEV_REFUSED": DEV_REFUSED,
    "CT_QUEUE_GRACE_NS": QUEUE_GRACE_NS, "CT_RULE_ACTIVE": RULE_ACTIVE, "CT_RULE_EXE": RULE_EXE,
    "CT_RULE_COMM": RULE_COMM, "CT_RULE_UID": RULE_UID, "CT_RULE_UNIT": RULE_UNIT,
    "CT_RULE_USER": RULE_USER, "CT_RULE_APP": RULE_APP, "CT_EV_EMPTY": EV_EMPTY,
    "CT_EV_ROOT_EXIT": EV_ROOT_EXIT, "CT_EV_EXEC": EV_EXEC, "CT_EV_RULE": EV_RULE,
    "CT_EV_CLASS": EV_CLASS, "CT_EV_CGROUP_RMDIR": EV_CGROUP_RMDIR,
    "CT_EV_CGROUP_MKDIR": EV_CGROUP_MKDIR, "CT_EV_RETAG": EV_RETAG, "CT_EV_FULL": EV_FULL,
    "CT_EV_CGROUP_MOVE": EV_CGROUP_MOVE, "CT_EV_PEER": EV_PEER, "CT_EV_DEVICE": EV_DEVICE,
    "CT_FULL_LIMITS": FULL_LIMITS, "CT_FULL_TASKS": FULL_TASKS, "CT_FULL_PEERS": FULL_PEERS,
    "CT_FULL_TRAFFIC": FULL_TRAFFIC,
}
