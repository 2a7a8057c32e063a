"""Download queues for remote senders: delay instead of drop.

A sender on another machine cannot be paced from here.  Its packets for a limited socket are
put in a queue of that limit's own and released at the limit's rate, so TCP sees a longer
RTT instead of losses; the limited sockets' receive windows are bounded (sock_ops) so the
queue never overflows.  What the daemon adds, only while some limit has a download rate:

* per device a limited download arrived on (the packet path reports each such device
  once; loopback, ifb devices and bridge ports are never used), an ifb device
  ``ctifb<ifindex>`` (link alias ``chadthrottle``) with an htb root ``1:`` and one class
  ``1:<n>`` (with a packet FIFO ``<n>:``) per limit with remote downloads;
* on the uplink's ingress, a clsact qdisc with one filter (handle 1, preference 0xC7A7): our
  classifier ``ct_tc_classify`` in direct-action mode, which looks the packet's socket up
  and, for a limited one, puts the class in ``skb->priority`` (htb classifies by it) and
  redirects the packet to the ifb's egress (``bpf_redirect``; the ifb's ifindex is in the
  device's ``dl_devices`` entry).  A device whose ingress already has a qdisc the daemon did
  not create is left alone (its downloads are held by the backstop).

The clsact qdisc and the filter are made through libbpf's tc API (in-process netlink); the
ifb devices, the htb root, the classes and their FIFOs through iproute2's ``ip`` and ``tc``
(``-batch -``: one process for several commands; ``-json`` to read).  Every call is
synchronous and short (a few milliseconds a process), made on the caller's thread, so in
the network namespace of that thread.

Between a device's first limited download and its queue (the calls above, a few
milliseconds) the backstop would police the sender's first flight: for at most
``abi.QUEUE_GRACE_NS`` the packet path lets those downloads pass instead (counted as
``queue_grace``), and the daemon ends the grace as soon as the device is queued or refused.

Everything is removed when the last download limit goes and when the daemon stops; a daemon
starting after a crash removes what a previous one left (recognised by the names above).

ifb devices drop what was not redirected to them; ``bpf_redirect`` marks a packet
redirected from ingress since Linux 6.4: on older kernels no queue is made (the backstop
holds those downloads).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field

from .. import abi, libbpf, names

log = logging.getLogger("chadthrottle.queues")

HTB_ROOT = 0x10000
FILTER_HANDLE = names.TC_FILTER_HANDLE
FIRST_MINOR = 2
LAST_MINOR = 0xFFFE
#: each class holds this much of its rate before it drops (windows are bounded far below)
QUEUE_SECONDS = 0.5
QUEUE_MIN = 64 * 1024
#: headers around each MSS-sized payload as htb counts them (Ethernet 14, IPv4 20, TCP with
#: timestamps 32 = 66): limits are payload.  A little less is counted, so the queue releases
#: a hair under the limit and the backstop bucket behind it never meets a packet it must drop
WIRE_OVERHEAD = 60
CLASS_KEY_UNIT = 1 << 63
#: class statistics are read at most this often per device (GetStats and the journal lines
#: ask once per limit)
STATS_TTL = 1.0
#: how old a listing of the devices may be when a device's first limited download arrives
LINKS_TTL = 5.0
#: the first kernel whose ifb accepts packets redirected by bpf_redirect from tc ingress
#: (__bpf_tx_skb sets skb->redirected and skb->from_ingress)
REDIRECT_TO_IFB = (6, 4)
#: the names our filter carries (libbpf's, after the program) or carried
FILTER_NAMES = (names.PROG_TC_CLASSIFY, names.TC_FILTER_NAME)
TOOL_TIMEOUT = 10.0
_TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class NetError(OSError):
    """An ip or tc command failed (its message is iproute2's)."""


_tools: dict[str, str] = {}


def _tool(name: str) -> str:
    if name not in _tools:
        path = os.environ.get("PATH", "")
        found = shutil.which(name, path=f"{path}:{_TOOL_PATH}" if path else _TOOL_PATH)
        if found is None:
            raise NetError(errno.ENOENT, f"{name} not found (install iproute2)")
        _tools[name] = found
    return _tools[name]


def run(tool: str, *args: str, batch: list[str] | None = None) -> str:
    """Run ``ip`` or ``tc`` with fixed arguments (never a shell); with ``batch``, those
    commands in one process (``-batch -``: it stops at the first that fails).  Its output;
    NetError when it fails."""
    argv = [_tool(tool), *args]
    if batch is not None:
        argv += ["-batch", "-"]
    try:
        p = subprocess.run(argv, input="".join(f"{c}\n" for c in batch or ()),
                           capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetError(errno.EIO, f"{tool}: {exc}") from exc
    if p.returncode != 0:
        what = " ".join(args) if batch is None else "; ".join(batch)
        msg = (p.stderr or p.stdout).strip().replace("\n", " ")
        raise NetError(errno.EIO, f"{tool} {what}: {msg}")
    return p.stdout


def _json(tool: str, *args: str) -> list:
    out = run(tool, "-json", *args).strip()
    return json.loads(out) if out else []


def _kernel_redirects_to_ifb(release: str | None = None) -> bool:
    release = release or os.uname().release
    try:
        major, minor = (int("".join(c for c in x if c.isdigit()) or 0)
                        for x in release.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= REDIRECT_TO_IFB


def _exists(ifname: str) -> bool:
    """A device of that name in this thread's network namespace (no process to run)."""
    try:
        socket.if_nametoindex(ifname)
    except OSError:
        return False
    return True


def _is_our_ifb(link: dict) -> bool:
    return (link.get("ifname", "").startswith(names.IFB_PREFIX)
            and link.get("ifalias") == names.IFACE_ALIAS
            and (link.get("linkinfo") or {}).get("info_kind") == "ifb")


def _is_our_filter(f: dict) -> bool:
    opts = f.get("options") or {}
    return (f.get("kind") == "bpf" and f.get("pref") == names.TC_FILTER_PRIO
            and opts.get("handle") in (hex(FILTER_HANDLE), FILTER_HANDLE)
            and str(opts.get("bpf_name", "")).startswith(FILTER_NAMES))


@dataclass
class _Uplink:
    index: int
    name: str
    mtu: int
    ifb: int
    own_clsact: bool
    classes: set[int] = field(default_factory=set)

    @property
    def ifname(self) -> str:
        return f"{names.IFB_PREFIX}{self.index}"


class Queues:
    def __init__(self, kernel) -> None:
        self._kernel = kernel
        self._uplinks: dict[int, _Uplink] = {}
        self._minor: dict[int, int] = {}   # class key -> minor
        self._rate: dict[int, int] = {}    # class key -> download rate (payload bytes/s)
        self._wanted: dict[int, int] = {}  # every limit with a download rate -> its rate
        self._devices: set[int] = set()    # devices limited downloads arrived on
        self._free = list(range(LAST_MINOR, FIRST_MINOR - 1, -1))
        self._stats: dict[str, tuple[float, dict[int, tuple[int, int]]]] = {}
        self._links: tuple[float, dict[int, dict]] | None = None  # (when, candidates)
        self.refused: dict[str, str] = {}  # device -> why it has no queue

    # -- what a crashed run left ---------------------------------------------------------
    def cleanup_leftovers(self) -> int:
        """Remove what an earlier daemon left (a crash): our filters, the clsact qdiscs
        holding nothing else, our ifb devices.  Returns how many things were removed.  A
        run makes its ifb devices first and removes them last, so without one of ours in
        this network namespace there is nothing to look for (and no command to run)."""
        try:
            present = [name for _, name in socket.if_nameindex()]
        except OSError:
            present = [names.IFB_PREFIX]
        if not any(n.startswith(names.IFB_PREFIX) for n in present):
            return 0
        try:
            return self._cleanup_leftovers()
        except (OSError, ValueError) as exc:
            log.warning("cannot remove what an earlier run left: %s", exc)
            return 0

    def _cleanup_leftovers(self) -> int:
        links = _json("ip", "-details", "link", "show")
        ours = sorted(link["ifname"] for link in links if _is_our_ifb(link))
        clsact = {q.get("dev") for q in _json("tc", "qdisc", "show") if q.get("kind") == "clsact"}
        removed = 0
        # the filters first: until it goes, a filter would redirect into a missing ifb
        for link in links:
            name = link.get("ifname", "")
            if name in clsact and (link.get("linkinfo") or {}).get("info_kind") != "ifb":
                made_by_us = f"{names.IFB_PREFIX}{link['ifindex']}" in ours
                removed += self._remove_our_filter(link["ifindex"], name, made_by_us)
        if ours:
            run("ip", batch=[f"link del dev {name}" for name in ours])
            for name in ours:
                log.info("removed %s, left by an earlier run", name)
            removed += len(ours)
        return removed

    def _remove_our_filter(self, index: int, name: str, made_by_us: bool) -> int:
        """Our filter on this device's ingress, and the clsact qdisc when nothing else is in
        it (also when it is empty and the device's ifb is ours: a run stopped between the
        two)."""
        if libbpf.tc_query_ingress(index, FILTER_HANDLE, names.TC_FILTER_PRIO) is None \
                and not made_by_us:
            return 0
        ingress, egress = (
            [json.loads(line) for line in run(
                "tc", "-json", batch=[f"filter show dev {name} ingress",
                                      f"filter show dev {name} egress"]).splitlines()
             if line.strip()] + [[], []])[:2]
        mine = any(_is_our_filter(f) for f in ingress)
        others = [f for f in ingress + egress if "options" in f and not _is_our_filter(f)]
        if not mine and (others or not made_by_us):
            return 0
        if not others:
            libbpf.tc_clsact_destroy(index)
            log.info("removed the clsact qdisc an earlier run left on %s", name)
        else:
            libbpf.tc_detach_ingress(index, FILTER_HANDLE, names.TC_FILTER_PRIO)
            log.info("removed the filter an earlier run left on %s", name)
        return 1

    # -- the devices -----------------------------------------------------------------------
    def _candidates(self, fresh: bool = True) -> dict[int, dict]:
        """The devices that may get a queue, by ifindex.  ``fresh=False``: a listing up to
        LINKS_TTL old will do (one ``ip`` process less between a device's first limited
        download and its queue; the listing is made when a download limit is set)."""
        now = time.monotonic()
        if not fresh and self._links is not None and now - self._links[0] < LINKS_TTL:
            return self._links[1]
        out = {}
        for link in _json("ip", "-details", "link", "show"):
            name = link.get("ifname", "")
            if name == "lo" or name.startswith(names.IFB_PREFIX):
                continue
            if "LOOPBACK" in link.get("flags", ()) or link.get("master"):
                continue  # a bridge or bond port: the master device sees the packets
            if (link.get("linkinfo") or {}).get("info_kind") == "ifb":
                continue
            if "UP" not in link.get("flags", ()):
                continue
            out[link["ifindex"]] = link
        self._links = (now, out)
        return out

    def _install(self, link: dict) -> _Uplink | None:
        index, name = link["ifindex"], link["ifname"]
        mtu = link.get("mtu") or 1500
        if not _kernel_redirects_to_ifb():
            return self._refuse(name, f"kernel {os.uname().release} drops packets redirected "
                                      "to an ifb by BPF (Linux 6.4 and later accept them)")
        up = _Uplink(index, name, mtu, 0, True)
        added_ifb = added_clsact = False
        try:
            if _exists(up.ifname):
                raise NetError(errno.EEXIST, f"{up.ifname} exists already")
            added_ifb = True
            run("ip", batch=[f"link add name {up.ifname} up type ifb",
                             f"link set dev {up.ifname} alias {names.IFACE_ALIAS}"])
            up.ifb = socket.if_nametoindex(up.ifname)
            run("tc", batch=[f"qdisc add dev {up.ifname} root handle 1: htb default 0",
                             *(c for key, minor in self._minor.items()
                               for c in self._class_commands(up, minor, self._rate[key]))])
            up.classes.update(self._minor.values())
            try:
                with libbpf.expected_errors():
                    libbpf.tc_clsact_create(index)
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
                self._del_ifb(up.ifname)
                return self._refuse(name, "its ingress has a qdisc chadthrottled did not "
                                          "create")
            added_clsact = True
            libbpf.tc_attach_ingress(index, self._kernel.obj.program_fd(names.PROG_TC_CLASSIFY),
                                     FILTER_HANDLE, names.TC_FILTER_PRIO)
        except OSError as exc:  # a half-made queue: undo what this call added (an empty
            # clsact included: it must not stay on the uplink)
            log.warning("no download queue on %s: %s", name, exc)
            self.refused[name] = str(exc)
            if added_clsact:
                self._del_clsact(index, name)
            if added_ifb:
                self._del_ifb(up.ifname)
            return None
        log.info("download queue on %s: %s (htb 1:), clsact ingress filter %s", name,
                 up.ifname, names.PROG_TC_CLASSIFY)
        self._uplinks[index] = up
        return up

    def _refuse(self, name: str, why: str) -> None:
        self.refused[name] = why
        log.warning("no download queue on %s: %s; its remote downloads are held by the "
                    "backstop alone", name, why)
        return None

    @staticmethod
    def _del_clsact(index: int, name: str) -> None:
        try:
            with libbpf.expected_errors():
                libbpf.tc_clsact_destroy(index)
        except OSError as exc:  # gone with its device: nothing to say
            if exc.errno not in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
                log.warning("removing the clsact qdisc of %s: %s", name, exc)

    def _del_ifb(self, ifname: str) -> None:
        if not _exists(ifname):
            return  # not there (never made, or gone with its namespace)
        try:
            run("ip", "link", "del", "dev", ifname)
        except NetError as exc:
            log.warning("removing %s: %s", ifname, exc)

    def _uninstall(self, up: _Uplink) -> None:
        if up.own_clsact:
            self._del_clsact(up.index, up.name)
        self._del_ifb(up.ifname)
        self._stats.pop(up.ifname, None)
        log.info("download queue on %s removed", up.name)

    def scan(self, fresh: bool = True) -> None:
        """Queues on uplinks that came up (while a download limit exists); remove those of
        uplinks that went down or away."""
        if not self._wanted or not (self._devices or self._uplinks):
            return  # no limited download arrived on a device yet: nothing to look at
        try:
            present = self._candidates(fresh)
        except NetError as exc:
            log.warning("cannot list the network devices: %s", exc)
            return
        for index in list(self._uplinks):
            if index not in present:
                self._uninstall(self._uplinks.pop(index))
        for index in self._devices:
            if index in self._uplinks:
                continue
            link = present.get(index)
            up = None
            if link is not None and link["ifname"] not in self.refused:
                up = self._install(link)
            if up is not None:
                self._mark(index, abi.DEV_QUEUED, up.ifb)
            else:  # no queue will come: the bucket holds its downloads from now on
                self._mark(index, abi.DEV_REFUSED)

    def _mark(self, index: int, state: int, ifb: int = 0) -> None:
        """Tell the packet path what became of a device it reported (its grace ends); a
        queued one with the ifb its classifier redirects to."""
        fd = self._kernel.fd(names.MAP_DL_DEVICES)
        dev = abi.Device()
        if libbpf.map_lookup(fd, ctypes.c_uint32(index), dev) \
                and (dev.state, dev.ifb) != (state, ifb):
            dev.state, dev.ifb = state, ifb
            libbpf.map_update(fd, ctypes.c_uint32(index), dev)

    def device_needed(self, ifindex: int) -> None:
        """A limited download arrived on this device."""
        self._devices.add(ifindex)
        self.scan(fresh=ifindex not in (self._links or (0, {}))[1])

    # -- classes -----------------------------------------------------------------------
    @staticmethod
    def _class_commands(up: _Uplink, minor: int, rate: int) -> list[str]:
        mss = max(up.mtu - 52, 536)
        wire = max(int(rate * (mss + WIRE_OVERHEAD) / mss), 8)
        packets = max(int(rate * QUEUE_SECONDS), QUEUE_MIN) // (up.mtu + 14) + 1
        cmds = [f"class replace dev {up.ifname} parent 1: classid 1:{minor:x} htb "
                f"rate {wire}bps ceil {wire}bps"]
        if minor not in up.classes:
            cmds.append(f"qdisc replace dev {up.ifname} parent 1:{minor:x} handle {minor:x}: "
                        f"pfifo limit {packets}")
        return cmds

    def _set_class(self, minor: int, rate: int) -> None:
        """The class (made or changed) on every queued device.  Where tc fails, the
        limit's packets pass that device's htb unclassified (its direct queue) and the
        backstop holds them."""
        for up in list(self._uplinks.values()):
            try:
                run("tc", batch=self._class_commands(up, minor, rate))
            except NetError as exc:
                log.warning("download queue class 1:%x on %s: %s", minor, up.ifname, exc)
                continue
            up.classes.add(minor)
        self._stats.clear()

    def class_needed(self, key: int, unit: bool, rate: int) -> None:
        """Packets of a limit with a download rate came from a remote sender."""
        ckey = key | CLASS_KEY_UNIT if unit else key
        if ckey in self._minor or not rate:
            return
        if not self._free:
            log.warning("no download queue left for limit %d (at most %d)", key,
                        LAST_MINOR - FIRST_MINOR + 1)
            return
        self._minor[ckey] = self._free.pop()
        self._rate[ckey] = rate
        self._set_class(self._minor[ckey], rate)
        libbpf.map_update(self._kernel.fd(names.MAP_DL_CLASS), ctypes.c_uint64(ckey),
                          ctypes.c_uint32(self._minor[ckey]))

    def changed(self, key: int, unit: bool, rate: int) -> None:
        """A limit was made or changed with this download rate (0: it has none, or it is
        gone).  The devices exist while some limit has a download rate.  Bookkeeping only,
        unless there is work (a class to change or remove, devices to add or drop)."""
        ckey = key | CLASS_KEY_UNIT if unit else key
        if rate:
            self._wanted[ckey] = rate
        else:
            self._wanted.pop(ckey, None)
        if rate and not self._devices:
            try:  # ready for the first limited download (at most one listing per LINKS_TTL)
                self._candidates(fresh=False)
            except NetError as exc:
                log.debug("listing the devices: %s", exc)
        if not (ckey in self._minor or (not self._wanted and self._uplinks)
                or (rate and self._devices and not self._uplinks)):
            return
        if rate:
            self.scan()
        minor = self._minor.get(ckey)
        if minor is not None and rate:
            self._rate[ckey] = rate
            self._set_class(minor, rate)
        elif minor is not None:
            libbpf.map_delete(self._kernel.fd(names.MAP_DL_CLASS), ctypes.c_uint64(ckey))
            del self._minor[ckey], self._rate[ckey]
            for up in self._uplinks.values():
                if minor in up.classes:
                    try:
                        run("tc", "class", "del", "dev", up.ifname, "classid", f"1:{minor:x}")
                    except NetError:
                        log.debug("class del", exc_info=True)
                    up.classes.discard(minor)
            self._stats.clear()
            self._free.append(minor)
        if not self._wanted and self._uplinks:
            self._close()

    def _class_stats(self, up: _Uplink) -> dict[int, tuple[int, int]]:
        """minor -> (bytes queued, packets dropped) of the device's classes, read at most
        every STATS_TTL.  A class's queue is its FIFO ``<minor>:`` (htb's leaf counters are
        that qdisc's)."""
        now = time.monotonic()
        cached = self._stats.get(up.ifname)
        if cached is not None and now - cached[0] < STATS_TTL:
            return cached[1]
        out: dict[int, tuple[int, int]] = {}
        try:
            for q in _json("tc", "-stats", "qdisc", "show", "dev", up.ifname):
                if q.get("kind") != "pfifo" or not str(q.get("parent", "")).startswith("1:"):
                    continue
                minor = int(str(q["parent"]).split(":")[1], 16)
                out[minor] = (int(q.get("backlog", 0)), int(q.get("drops", 0)))
        except (NetError, ValueError, KeyError) as exc:
            log.debug("statistics of %s: %s", up.ifname, exc)
        self._stats[up.ifname] = (now, out)
        return out

    def stats(self, key: int, unit: bool = False) -> tuple[int, int]:
        """(bytes queued now, packets dropped by the queue) of a limit, over its devices."""
        minor = self._minor.get(key | CLASS_KEY_UNIT if unit else key)
        if minor is None or not self._uplinks:
            return 0, 0  # no queue: nothing to read
        backlog = drops = 0
        for up in list(self._uplinks.values()):
            b, d = self._class_stats(up).get(minor, (0, 0))
            backlog += b
            drops += d
        return backlog, drops

    @property
    def devices(self) -> list[str]:
        return sorted(f"{up.name}->{up.ifname}" for up in self._uplinks.values())

    def close(self) -> None:
        """Remove everything this run added."""
        self._close()

    def _close(self) -> None:
        for up in list(self._uplinks.values()):
            self._uninstall(up)
        self._uplinks.clear()
        for ckey in list(self._minor):
            try:
                libbpf.map_delete(self._kernel.fd(names.MAP_DL_CLASS), ctypes.c_uint64(ckey))
            except (OSError, KeyError):
                pass
        self._minor.clear()
        self._rate.clear()
        self._stats.clear()
        self.refused.clear()
        self._devices.clear()
        try:  # the packet path reports devices again from now on
            for key in libbpf.map_keys(self._kernel.fd(names.MAP_DL_DEVICES), ctypes.c_uint32):
                libbpf.map_delete(self._kernel.fd(names.MAP_DL_DEVICES), ctypes.c_uint32(key))
        except (OSError, KeyError):
            pass
        self._free = list(range(LAST_MINOR, FIRST_MINOR - 1, -1))
