"""Download queues for remote senders: delay instead of drop.

A sender on another machine cannot be paced from here.  Its packets for a limited socket are
put in a queue of that limit's own and released at the limit's rate, so TCP sees a longer
RTT instead of losses; the limited sockets' receive windows are bounded (sock_ops) so the
queue never overflows.  What the daemon adds, only while some limit has a download rate:

* per device a limited download arrived on (the packet path reports each such device
  once; loopback, ifb devices and bridge ports are never used), an ifb device
  ``ctifb<ifindex>`` (link alias ``chadthrottle``) with an htb root ``1:`` and one class
  ``1:<n>`` (with a packet FIFO) per limit with remote downloads;
* on the uplink's ingress, a clsact qdisc with one filter: our classifier (``chadthrottle``,
  preference 0xC7A7), which looks the packet's socket up, and for a limited one sets the
  class and redirects the packet to the ifb (mirred).  A device whose ingress already has a
  qdisc the daemon did not create is left alone (its downloads are held by the backstop).

Between a device's first limited download and its queue (the netlink calls above, tens of
milliseconds) the backstop would police the sender's first flight: for at most
``abi.QUEUE_GRACE_NS`` the packet path lets those downloads pass instead (counted as
``queue_grace``), and the daemon ends the grace as soon as the device is queued or refused.

Everything is removed when the last download limit goes and when the daemon stops; a daemon
starting after a crash removes what a previous one left (recognised by the names above).

Netlink is spoken through pyroute2, on a thread of its own (its synchronous API runs an
event loop of its own, which cannot nest in the daemon's): every public method hands its
work to that thread and waits for it, so callers see plain synchronous calls.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .. import abi, libbpf, names

log = logging.getLogger("chadthrottle.queues")

HTB_ROOT = 0x10000
CLSACT_INGRESS = "ffff:fff2"
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


@dataclass
class _Uplink:
    index: int
    name: str
    mtu: int
    ifb: int
    own_clsact: bool
    classes: set[int] = field(default_factory=set)


def _ipr():
    from pyroute2 import IPRoute  # imported late: only where queues are used

    return IPRoute()


def _on_net_thread(fn):
    """Run the method on the queues' netlink thread and wait for its result."""
    @functools.wraps(fn)
    def run(self, *args, **kw):
        return self._worker.submit(fn, self, *args, **kw).result()
    return run


class Queues:
    def __init__(self, kernel) -> None:
        self._kernel = kernel
        self._uplinks: dict[int, _Uplink] = {}
        self._minor: dict[int, int] = {}   # class key -> minor
        self._rate: dict[int, int] = {}    # class key -> download rate (payload bytes/s)
        self._wanted: dict[int, int] = {}  # every limit with a download rate -> its rate
        self._devices: set[int] = set()    # devices limited downloads arrived on
        self._free = list(range(LAST_MINOR, FIRST_MINOR - 1, -1))
        self._ipr = None
        self._warming = False
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="netlink")
        self.refused: dict[str, str] = {}  # device -> why it has no queue

    # -- the devices -------------------------------------------------------------------
    def _net(self):
        if self._ipr is None:
            self._ipr = _ipr()
        return self._ipr

    def cleanup_leftovers(self) -> int:
        """Remove what an earlier daemon left (a crash): our filters, the clsact qdiscs
        holding nothing else, our ifb devices.  Returns how many things were removed.  A
        run makes its ifb devices first and removes them last, so without one of ours among
        this network namespace's devices there is nothing to look for (and no netlink to
        speak).  The devices are listed by if_nameindex(), which sees the daemon's network
        namespace (/sys/class/net shows the one /sys was mounted in)."""
        try:
            ours = [n for _, n in socket.if_nameindex() if n.startswith(names.IFB_PREFIX)]
        except OSError:
            ours = [names.IFB_PREFIX]
        if not ours:
            return 0
        return self._cleanup_leftovers()

    @_on_net_thread
    def _cleanup_leftovers(self) -> int:
        ipr = self._net()
        removed = 0
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            alias = link.get_attr("IFLA_IFALIAS") or ""
            kind = (link.get_attr("IFLA_LINKINFO") or {})
            kind = kind.get_attr("IFLA_INFO_KIND") if hasattr(kind, "get_attr") else ""
            if name.startswith(names.IFB_PREFIX) and (alias == names.IFACE_ALIAS or kind == "ifb"):
                if alias == names.IFACE_ALIAS:
                    ipr.link("del", index=link["index"])
                    removed += 1
                    log.info("removed %s, left by an earlier run", name)
                    continue
            removed += self._remove_our_filter(link["index"], name)
        return removed

    def _ingress_filters(self, index: int) -> list:
        try:
            return list(self._net().get_filters(index=index, parent=0xFFFFFFF2))
        except Exception:  # no clsact: nothing there
            return []

    def _is_ours(self, f) -> bool:
        opts = f.get_attr("TCA_OPTIONS")
        name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
        return f["info"] >> 16 == names.TC_FILTER_PRIO and (name or "").startswith(
            names.TC_FILTER_NAME)

    def _remove_our_filter(self, index: int, name: str) -> int:
        filters = [f for f in self._ingress_filters(index) if f.get_attr("TCA_KIND") == "bpf"]
        ours = [f for f in filters if self._is_ours(f)]
        if not ours:
            return 0
        others = [f for f in self._ingress_filters(index) if not self._is_ours(f)
                  and f.get_attr("TCA_OPTIONS") is not None]
        ipr = self._net()
        if not others:
            ipr.tc("del", "clsact", index)
            log.info("removed the clsact qdisc an earlier run left on %s", name)
        else:
            ipr.tc("del-filter", "bpf", index, parent=CLSACT_INGRESS, prio=names.TC_FILTER_PRIO)
            log.info("removed the filter an earlier run left on %s", name)
        return 1

    def _candidates(self) -> list:
        out = []
        for link in self._net().get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            if name == "lo" or name.startswith(names.IFB_PREFIX):
                continue
            if link.get_attr("IFLA_MASTER"):
                continue  # a bridge or bond port: the master device sees the packets
            if not link["flags"] & 1:  # IFF_UP
                continue
            out.append(link)
        return out

    def _has_ingress_qdisc(self, index: int) -> bool:
        for q in self._net().get_qdiscs(index=index):
            if q["parent"] == 0xFFFFFFF1 or q.get_attr("TCA_KIND") in ("ingress", "clsact"):
                return True
        return False

    def _install(self, link) -> _Uplink | None:
        ipr = self._net()
        index, name = link["index"], link.get_attr("IFLA_IFNAME")
        mtu = link.get_attr("IFLA_MTU") or 1500
        own = not self._has_ingress_qdisc(index)
        if not own:
            self.refused[name] = "its ingress has a qdisc chadthrottled did not create"
            log.warning("no download queue on %s: %s; its remote downloads are held by the "
                        "backstop alone", name, self.refused[name])
            return None
        ifname = f"{names.IFB_PREFIX}{index}"
        added_clsact = False
        try:
            ipr.link("add", ifname=ifname, kind="ifb")
            ifb = ipr.link_lookup(ifname=ifname)[0]
            ipr.link("set", index=ifb, ifalias=names.IFACE_ALIAS, state="up")
            ipr.tc("add", "htb", ifb, HTB_ROOT, default=0)
            ipr.tc("add", "clsact", index)
            added_clsact = True
            fd = self._kernel.obj.program_fd(names.PROG_TC_CLASSIFY)
            ipr.tc("add-filter", "bpf", index, ":1", fd=fd, name=names.TC_FILTER_NAME,
                   parent=CLSACT_INGRESS, prio=names.TC_FILTER_PRIO,
                   action=[{"kind": "mirred", "direction": "egress", "action": "redirect",
                            "ifindex": ifb}])
        except Exception as exc:
            log.warning("no download queue on %s: %s", name, exc)
            self.refused[name] = str(exc)
            self._uninstall_partial(index, ifname, added_clsact)
            return None
        log.info("download queue on %s: %s (htb 1:), clsact ingress filter %s", name, ifname,
                 names.TC_FILTER_NAME)
        up = _Uplink(index, name, mtu, ifb, own)
        self._uplinks[index] = up
        for key, minor in self._minor.items():
            self._add_class(up, minor, self._rate[key])
        return up

    def _uninstall_partial(self, index: int, ifname: str, added_clsact: bool) -> None:
        """Undo a half-made queue: the ifb, and the clsact qdisc if this run added it (even
        when the filter was never attached: an empty clsact must not stay on the uplink)."""
        ipr = self._net()
        for idx in ipr.link_lookup(ifname=ifname):
            try:
                ipr.link("del", index=idx)
            except Exception:
                pass
        if added_clsact or any(self._is_ours(f) for f in self._ingress_filters(index)):
            try:
                ipr.tc("del", "clsact", index)
            except Exception:
                pass

    def _uninstall(self, up: _Uplink) -> None:
        ipr = self._net()
        try:
            if up.own_clsact:
                ipr.tc("del", "clsact", up.index)
        except Exception as exc:
            if getattr(exc, "code", None) not in (errno.ENODEV, errno.EINVAL, errno.ENOENT):
                log.warning("removing the clsact qdisc of %s: %s", up.name, exc)
        try:
            ipr.link("del", index=up.ifb)
        except Exception as exc:
            if getattr(exc, "code", None) != errno.ENODEV:
                log.warning("removing %s%d: %s", names.IFB_PREFIX, up.index, exc)
        log.info("download queue on %s removed", up.name)

    @_on_net_thread
    def scan(self) -> None:
        """Queues on uplinks that came up (while a download limit exists); forget those that
        went away."""
        self._scan()

    def _scan(self) -> None:
        if not self._wanted:
            return
        present = {link["index"]: link for link in self._candidates()}
        for index in list(self._uplinks):
            if index not in present:
                self._uplinks.pop(index)
        for index in self._devices:
            if index in self._uplinks:
                continue
            link = present.get(index)
            if link is not None and link.get_attr("IFLA_IFNAME") not in self.refused \
                    and self._install(link) is not None:
                self._mark(index, abi.DEV_QUEUED)
            else:  # no queue will come: the bucket holds its downloads from now on
                self._mark(index, abi.DEV_REFUSED)

    def _mark(self, index: int, state: int) -> None:
        """Tell the packet path what became of a device it reported (its grace ends)."""
        fd = self._kernel.fd(names.MAP_DL_DEVICES)
        dev = abi.Device()
        if libbpf.map_lookup(fd, ctypes.c_uint32(index), dev) and dev.state != state:
            dev.state = state
            libbpf.map_update(fd, ctypes.c_uint32(index), dev)

    @_on_net_thread
    def device_needed(self, ifindex: int) -> None:
        """A limited download arrived on this device."""
        self._devices.add(ifindex)
        self._scan()

    # -- classes -----------------------------------------------------------------------
    def _add_class(self, up: _Uplink, minor: int, rate: int) -> None:
        mss = max(up.mtu - 52, 536)
        wire = max(int(rate * (mss + WIRE_OVERHEAD) / mss), 8)
        packets = max(int(rate * QUEUE_SECONDS), QUEUE_MIN) // (up.mtu + 14) + 1
        ipr = self._net()
        handle = HTB_ROOT | minor
        ipr.tc("replace-class", "htb", up.ifb, handle, parent=HTB_ROOT, rate=wire,
               ceil=wire)
        if minor not in up.classes:
            ipr.tc("replace", "pfifo", up.ifb, minor << 16, parent=handle, limit=packets)
            up.classes.add(minor)

    @_on_net_thread
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
        for up in self._uplinks.values():
            self._add_class(up, self._minor[ckey], rate)
        libbpf.map_update(self._kernel.fd(names.MAP_DL_CLASS), ctypes.c_uint64(ckey),
                          ctypes.c_uint32(self._minor[ckey]))

    def changed(self, key: int, unit: bool, rate: int) -> None:
        """A limit was made or changed with this download rate (0: it has none, or it is
        gone).  The devices exist while some limit has a download rate.  Bookkeeping only,
        unless netlink has work (a class to change or remove, devices to add or drop)."""
        ckey = key | CLASS_KEY_UNIT if unit else key
        if rate and self._ipr is None and not self._warming:
            # netlink (pyroute2's import: ~0.2 s) is made ready now, not when the first
            # limited download arrives and waits for its queue
            self._warming = True
            self._worker.submit(self._net)
        if rate:
            self._wanted[ckey] = rate
        else:
            self._wanted.pop(ckey, None)
        if ckey in self._minor or (not self._wanted and self._uplinks) \
                or (rate and self._devices and not self._uplinks):
            self._changed(ckey, rate)

    @_on_net_thread
    def _changed(self, ckey: int, rate: int) -> None:
        if rate:
            self._scan()
        minor = self._minor.get(ckey)
        if minor is not None and rate:
            self._rate[ckey] = rate
            for up in self._uplinks.values():
                self._add_class(up, minor, rate)
        elif minor is not None:
            libbpf.map_delete(self._kernel.fd(names.MAP_DL_CLASS), ctypes.c_uint64(ckey))
            del self._minor[ckey], self._rate[ckey]
            ipr = self._net()
            for up in self._uplinks.values():
                if minor in up.classes:
                    try:
                        ipr.tc("del-class", "htb", up.ifb, HTB_ROOT | minor)
                    except Exception:
                        log.debug("del-class", exc_info=True)
                    up.classes.discard(minor)
            self._free.append(minor)
        if not self._wanted and self._uplinks:
            self._close()

    def stats(self, key: int, unit: bool = False) -> tuple[int, int]:
        """(bytes queued now, packets dropped by the queue) of a limit, over its devices."""
        if (key | CLASS_KEY_UNIT if unit else key) not in self._minor or not self._uplinks:
            return 0, 0  # no queue: no netlink round trip
        return self._stats(key, unit)

    @_on_net_thread
    def _stats(self, key: int, unit: bool) -> tuple[int, int]:
        minor = self._minor.get(key | CLASS_KEY_UNIT if unit else key)
        if minor is None or not self._uplinks:
            return 0, 0
        backlog = drops = 0
        for up in self._uplinks.values():
            for c in self._net().get_classes(index=up.ifb):
                if c["handle"] == HTB_ROOT | minor:
                    st = c.get_attr("TCA_STATS") or {}
                    backlog += int(st.get("backlog", 0) if isinstance(st, dict) else 0)
                    drops += int(st.get("drops", 0) if isinstance(st, dict) else 0)
        return backlog, drops

    @property
    def devices(self) -> list[str]:
        return sorted(f"{up.name}->{names.IFB_PREFIX}{up.index}" for up in self._uplinks.values())

    def close(self) -> None:
        """Remove everything this run added, and end the netlink thread."""
        try:
            self._worker.submit(self._close, True).result()
        finally:
            self._worker.shutdown()

    def _close(self, final: bool = False) -> None:
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
        self.refused.clear()
        self._devices.clear()
        try:  # the packet path reports devices again from now on
            for key in libbpf.map_keys(self._kernel.fd(names.MAP_DL_DEVICES), ctypes.c_uint32):
                libbpf.map_delete(self._kernel.fd(names.MAP_DL_DEVICES), ctypes.c_uint32(key))
        except (OSError, KeyError):
            pass
        self._free = list(range(LAST_MINOR, FIRST_MINOR - 1, -1))
        if final and self._ipr is not None:
            self._ipr.close()
            self._ipr = None
            self._warming = False

