"""The throttling engine: limits, socket tagging, process lifecycle and statistics.

No D-Bus here.  (INTERFACE DRAFT: bodies land with issue 2.)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limit:
    pid: int
    download: int  # bytes/s, 0 = unlimited in that direction
    upload: int
    burst_download: int  # bucket size in bytes
    burst_upload: int


@dataclass(frozen=True)
class UnitLimit:
    cgroup: str  # path relative to the cgroup2 mount, e.g. "user.slice/foo.service"
    cgroup_id: int
    download: int
    upload: int


@dataclass(frozen=True)
class ProcessStats:
    pid: int
    comm: str
    cgroup: str  # relative to the cgroup2 mount, "/" for the root
    download_limit: int
    upload_limit: int
    download_rate: float  # bytes/s over the last sample window
    upload_rate: float
    download_bytes: int  # cumulative bytes passed
    upload_bytes: int
    download_packets: int
    upload_packets: int
    download_dropped: int  # packets
    upload_dropped: int
    download_dropped_bytes: int
    upload_dropped_bytes: int
    program_calls: int  # BPF program invocations for this process's packets
    status: str  # names.STATUS_*


class Engine:
    def __init__(self, *, object_path=None, cgroup_root=None, monitor_root=False): ...
    def open(self) -> None: ...
    def close(self) -> None: ...
    def set_limit(self, pid, download, upload, *, burst_download=None, burst_upload=None) -> Limit: ...
    def clear_limit(self, pid) -> None: ...
    def list_limits(self) -> list[Limit]: ...
    def set_unit_limit(self, unit_or_cgroup, download, upload) -> UnitLimit: ...
    def clear_unit_limit(self, unit_or_cgroup) -> None: ...
    def list_unit_limits(self) -> list[UnitLimit]: ...
    def stats(self, pid) -> ProcessStats: ...
    def sample(self) -> None: ...
    def list_processes(self) -> list[ProcessStats]: ...
    @property
    def attached_cgroups(self) -> list[str]: ...
    def limit_pidfd(self, pid) -> int: ...
    def reap(self) -> list[int]: ...
