"""A :class:`Snapshot` as Prometheus metric families (pure: no I/O, any thread).

Naming follows the Prometheus conventions: the ``chadthrottle_`` prefix, base units in the
name (``_bytes``, ``_seconds``, ``_bytes_per_second``), ``_total`` on counters, ``_info``
for constant labels.  Labels:

* per limit: ``pid`` (the process the limit was set on or matched for), ``comm`` (its name,
  control characters escaped), ``rule`` (the rule's id, "" for SetLimit), ``unit`` (the
  systemd unit of its cgroup, "" when none), and ``direction`` (``download``/``upload``);
* per unit limit: ``unit`` (the cgroup path) and ``direction``; per rule: ``rule`` and
  ``direction``;
* ``status`` (``throttled``, ``not-working``, ``not-dropping``, ``program-not-called``) on
  the status gauges, whose one series per limited direction has the value 1.

Cardinality is bounded by the limits (at most the kernel's CT_MAX_LIMITS budgets): a process
without a limit has no series of its own; every such process is summed into
``chadthrottle_unlimited_*``.  A direction that is not limited has no ``_max_`` and no
``_status`` series (so ``rate / max`` exists only where a limit does).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .. import abi, names
from .snapshot import DIRECTIONS, Direction, Snapshot

LIMIT_LABELS = ["pid", "comm", "rule", "unit"]

#: the kernel's global counters (abi.Global fields) -> (metric, help); a field not listed
#: here is exported as chadthrottle_bpf_<field>_total
KERNEL_COUNTERS = {
    "untagged": ("untagged_packets_total",
                 "Packets whose socket carries no process tag (not attributed)"),
    "dropped": ("dropped_packets_total", "Packets the BPF programs dropped, every limit"),
    "paced": ("pacing_updates_total", "Pacing rates set on sockets (SO_MAX_PACING_RATE)"),
    "retagged": ("retagged_sockets_total", "Sockets charged to a new process"),
    "full": ("map_full_total", "Times a map was full: a process could not be limited"),
    "events_lost": ("events_lost_total", "Kernel events lost because the ring buffer was full"),
    "queue_grace": ("queue_grace_packets_total",
                    "Over-limit download packets passed while their device's queue was made"),
}


def _counter(name: str, doc: str, labels: list[str], unit: str = "") -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels, unit=unit)


def _gauge(name: str, doc: str, labels: list[str], unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels, unit=unit)


def _per_direction(what: str, key: list[str],
                   rows: list[tuple[list[str], tuple[Direction, Direction]]],
                   names_: dict[str, str]) -> list[Metric]:
    """The counters, rate, limit and status of rows of (label values, directions)."""
    labels = [*key, "direction"]
    fam = {
        "bytes": _counter(names_["bytes"], f"Bytes {what} let through", labels, "bytes"),
        "packets": _counter(names_["packets"], f"Packets {what} let through", labels),
        "dropped_packets": _counter(names_["dropped_packets"], f"Packets {what} dropped",
                                    labels),
        "dropped_bytes": _counter(names_["dropped_bytes"], f"Bytes {what} dropped", labels,
                                  "bytes"),
        "rate": _gauge(names_["rate"], f"Bytes per second {what} let through over the last "
                       "2 s", labels, "bytes_per_second"),
        "max": _gauge(names_["max"], f"The rate {what} allows, bytes per second (limited "
                      "directions only)", labels, "bytes_per_second"),
        "status": _gauge(names_["status"], f"Verdict on {what}: 1 for the current status "
                         "(limited directions only)", [*labels, "status"]),
    }
    for values, dirs in rows:
        for direction, d in zip(DIRECTIONS, dirs, strict=True):
            lv = [*values, direction]
            fam["bytes"].add_metric(lv, d.counters.bytes)
            fam["packets"].add_metric(lv, d.counters.packets)
            fam["dropped_packets"].add_metric(lv, d.counters.dropped_packets)
            fam["dropped_bytes"].add_metric(lv, d.counters.dropped_bytes)
            fam["rate"].add_metric(lv, d.rate)
            if d.limit:
                fam["max"].add_metric(lv, d.limit)
                fam["status"].add_metric([*lv, d.status], 1)
    return list(fam.values())


def families(s: Snapshot) -> list[Metric]:
    out: list[Metric] = []
    # ---- per limit
    out += _per_direction(
        "the limit", LIMIT_LABELS,
        [([str(r.pid), r.comm, r.rule, r.unit], r.dirs) for r in s.limits],
        {"bytes": names.METRIC_LIMIT_BYTES, "packets": names.METRIC_LIMIT_PACKETS,
         "dropped_packets": names.METRIC_LIMIT_DROPPED_PACKETS,
         "dropped_bytes": names.METRIC_LIMIT_DROPPED_BYTES, "rate": names.METRIC_LIMIT_RATE,
         "max": names.METRIC_LIMIT_MAX, "status": names.METRIC_LIMIT_STATUS})
    procs = _gauge(names.METRIC_LIMIT_PROCESSES, "Processes in the limit now (the process "
                   "and its descendants)", LIMIT_LABELS)
    for r in s.limits:
        procs.add_metric([str(r.pid), r.comm, r.rule, r.unit], r.members)
    out.append(procs)
    # ---- per unit limit
    out += _per_direction(
        "the unit limit", ["unit"], [([r.unit], r.dirs) for r in s.units],
        {"bytes": names.METRIC_UNIT_BYTES, "packets": names.METRIC_UNIT_PACKETS,
         "dropped_packets": names.METRIC_UNIT_DROPPED_PACKETS,
         "dropped_bytes": names.METRIC_UNIT_DROPPED_BYTES, "rate": names.METRIC_UNIT_RATE,
         "max": names.METRIC_UNIT_MAX, "status": names.METRIC_UNIT_STATUS})
    # ---- per rule
    lab = ["rule", "direction"]
    rb = _counter(names.METRIC_RULE_BYTES, "Bytes the rule's limits let through, ended ones "
                  "included", lab, "bytes")
    rp = _counter(names.METRIC_RULE_PACKETS, "Packets the rule's limits let through", lab)
    rdp = _counter(names.METRIC_RULE_DROPPED_PACKETS, "Packets the rule's limits dropped", lab)
    rdb = _counter(names.METRIC_RULE_DROPPED_BYTES, "Bytes the rule's limits dropped", lab,
                   "bytes")
    rr = _gauge(names.METRIC_RULE_RATE, "Bytes per second the rule's limits let through now",
                lab, "bytes_per_second")
    rm = _gauge(names.METRIC_RULE_MAX, "The rule's rate in bytes per second (per process, "
                "or shared with scope=application; limited directions only)", lab,
                "bytes_per_second")
    rl = _gauge(names.METRIC_RULE_LIMITS, "The rule's limits in each status", [*lab, "status"])
    rproc = _gauge(names.METRIC_RULE_PROCESSES, "Processes the rule limits now", ["rule"])
    rinfo = InfoMetricFamily(names.METRIC_RULE_INFO.removesuffix("_info"), "A rule in force",
                             labels=["rule", "scope", "enabled", "permanent"])
    for r in s.rules:
        for direction, d in zip(DIRECTIONS, r.dirs, strict=True):
            lv = [r.rule, direction]
            rb.add_metric(lv, d.counters.bytes)
            rp.add_metric(lv, d.counters.packets)
            rdp.add_metric(lv, d.counters.dropped_packets)
            rdb.add_metric(lv, d.counters.dropped_bytes)
            rr.add_metric(lv, d.rate)
            if d.limit:
                rm.add_metric(lv, d.limit)
            for status, n in d.statuses:
                rl.add_metric([*lv, status], n)
        rproc.add_metric([r.rule], r.processes)
        rinfo.add_metric([r.rule, r.scope, str(r.enabled).lower(), str(r.permanent).lower()],
                         {})
    out += [rb, rp, rdp, rdb, rr, rm, rl, rproc, rinfo]
    # ---- every process without a limit, as one
    ub = _counter(names.METRIC_UNLIMITED_BYTES, "Bytes of processes without a limit, "
                  "together (processes below the attached cgroups)", ["direction"], "bytes")
    up = _counter(names.METRIC_UNLIMITED_PACKETS, "Packets of processes without a limit, "
                  "together", ["direction"])
    for i, direction in enumerate(DIRECTIONS):
        ub.add_metric([direction], s.unlimited.bytes[i])
        up.add_metric([direction], s.unlimited.packets[i])
    out += [ub, up, GaugeMetricFamily(
        names.METRIC_UNLIMITED_PROCESSES, "Processes without a limit that moved bytes since "
        "the previous scrape", value=s.unlimited.processes)]
    # ---- the daemon
    out.append(GaugeMetricFamily(names.METRIC_ATTACHED_CGROUPS, "Cgroups the programs are "
                                 "attached to", value=s.attached_cgroups))
    budgets = _gauge(names.METRIC_BUDGETS, "Budgets (limits) held, by origin", ["origin"])
    for origin in ("explicit", "rule"):
        budgets.add_metric([origin], dict(s.budgets).get(origin, 0))
    out.append(budgets)
    out.append(GaugeMetricFamily(names.METRIC_SUBSCRIBERS, "Stats subscribers",
                                 value=s.subscribers))
    out.append(GaugeMetricFamily(names.METRIC_SAMPLING, "1 while the sampler runs",
                                 value=int(s.sampling)))
    out.append(CounterMetricFamily(names.METRIC_SAMPLES, "Samples taken", value=s.samples))
    out.append(GaugeMetricFamily(names.METRIC_SAMPLE_DURATION, "How long the last sample "
                                 "took", value=s.sample_seconds, unit="seconds"))
    calls = _counter(names.METRIC_BUS_CALLS, "Method calls on the bus object, by member",
                     ["member"])
    for member, n in s.bus_calls:
        calls.add_metric([member], n)
    out.append(calls)
    entries = _gauge(names.METRIC_MAP_ENTRIES, "Entries of a BPF map now (maps whose fill "
                     "can change)", ["map", "type"])
    max_entries = _gauge(names.METRIC_MAP_MAX_ENTRIES, "max_entries of a BPF map (bytes for "
                         "the ring buffer; 0 for task and socket storage)", ["map", "type"])
    for m in s.maps:
        if m.entries is not None:
            entries.add_metric([m.name, m.type], m.entries)
        max_entries.add_metric([m.name, m.type], m.max_entries)
    out += [entries, max_entries]
    out += _kernel(s)
    out.append(GaugeMetricFamily(names.METRIC_SNAPSHOT_DURATION, "Time the daemon's event "
                                 "loop spent gathering this scrape", value=s.build_seconds,
                                 unit="seconds"))
    out.append(InfoMetricFamily(names.METRIC_BUILD_INFO.removesuffix("_info"),
                                "chadthrottle's version", value={"version": s.version}))
    return out


def _kernel(s: Snapshot) -> list[Metric]:
    fams: dict[str, CounterMetricFamily] = {}
    for field, direction, value in s.kernel:
        metric, doc = KERNEL_COUNTERS.get(field, (f"{field}_total", f"Kernel counter {field}"))
        fam = fams.get(field)
        if fam is None:
            fam = fams[field] = _counter(names.METRIC_BPF_PREFIX + metric, doc,
                                         ["direction"] if direction else [])
        fam.add_metric([direction] if direction else [], value)
    return list(fams.values())


class SnapshotCollector(Collector):
    """Yields the families of the snapshot ``source()`` returns (called on the HTTP
    thread: ``source`` must not touch the engine — see metrics.source)."""

    def __init__(self, source: Callable[[], Snapshot]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        yield from families(self._source())

    def describe(self) -> list[Metric]:
        """The families without samples: their names let the registry serve
        ``?name[]=...`` without gathering anything at registration."""
        return families(Snapshot(0.0, "", kernel=tuple(
            (field, "", 0) for field, _ in abi.Global._fields_)))
