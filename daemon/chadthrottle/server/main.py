"""chadthrottled: the root daemon serving org.chadthrottle.Throttle1 on the system bus.

Start-up order: open the engine (load + attach the BPF object; what a crashed run left on
network devices is removed), restore the runtime state and the rules (every limit is back
before the name is taken), connect to the system bus (``DBUS_SYSTEM_BUS_ADDRESS`` is
honoured), export the object, install the gate, watch NameOwnerChanged (subscribers that
leave the bus are forgotten), *then* request the name, then tell systemd READY=1.
SIGHUP (``systemctl reload``) re-reads the permanent rules (its default action would end
the daemon, and systemd counts that as a clean exit: no restart); the settings file
(``<config dir>/chadthrottled.toml``, :mod:`chadthrottle.config`) is read at start only, and
a reload says in the journal when it changed.  SIGTERM/SIGINT: release the
name, detach everything (engine.close()), exit 0.

With ``[metrics] listen`` set, an OpenMetrics endpoint (:mod:`chadthrottle.metrics`) listens
before the name is taken; a listener that cannot bind stops the start.

Sampling (once a second) runs only while something needs it: a Stats subscriber, a
process or unit limit, ``--monitor-all``, or a client that read rates (GetStats,
ListProcesses) in the last READ_GRACE seconds.  Otherwise the sampler sleeps until one of
those appears.  Stats signals go to each subscriber at its own interval.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import resource
import signal
import sys
import time

from dbus_fast import BusType, Message, MessageType, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.constants import NameFlag

from .. import __version__, config, names, paths
from ..errors import ChadthrottleError, InvalidConfig
from . import log as logsetup
from .diagnostics import INTERVAL as DIAG_INTERVAL
from .diagnostics import Diagnostics
from .sdnotify import notify, watchdog_interval

log = logging.getLogger("chadthrottle.server")

SAMPLE_INTERVAL = 1.0
#: a client that read rates keeps the sampler running this long (pollers such as
#: `chadthrottlectl top --json` in a loop, or an applet without Subscribe)
READ_GRACE = 30.0
NAME_OWNER_CHANGED_RULE = (f"type='signal',sender='{names.BUS_DRIVER}',"
                           f"interface='{names.BUS_DRIVER}',member='NameOwnerChanged',"
                           f"path='{names.BUS_DRIVER_PATH}'")
EXIT_OK = 0
EXIT_FAILURE = 1
#: the settings file or a setting on the command line is wrong (systemd's EXIT_NOTCONFIGURED)
EXIT_NOT_CONFIGURED = 6


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="chadthrottled",
        description="Per-process bandwidth limits with eBPF, served on the D-Bus system bus.",
    )
    p.add_argument("--log-level", default=None,
                   help="debug, info, warning, error (default: info, or $CHADTHROTTLE_LOG, "
                        "which also takes 'info,chadthrottle.engine=debug')")
    p.add_argument("--log-target", choices=("auto", "journal", "stderr"), default="auto",
                   help="auto: the journal when its socket exists, else stderr")
    p.add_argument("--bpf-object", default=None, help="path of throttle.bpf.o (default: bundled)")
    p.add_argument("--cgroup-root", default=None, help="cgroup2 mount (default: discovered)")
    p.add_argument("--monitor-all", action=argparse.BooleanOptionalAction, default=None,
                   help="attach at the cgroup2 root at start, so ListProcesses (and "
                        "chadthrottlectl top) shows every process with traffic before any "
                        "limit is set; by default programs attach lazily, once per stable "
                        "parent cgroup of a limited process (also monitor_all in "
                        "chadthrottled.toml, or $CHADTHROTTLE_MONITOR_ALL=1)")
    p.add_argument("--metrics-listen", default=None, metavar="ADDR",
                   help=f"serve OpenMetrics on ADDR: an IP address and port "
                        f"({config.SUGGESTED_LISTEN}, [::1]:9917) or unix:/PATH; '' for "
                        f"none (default: [metrics] listen in chadthrottled.toml, else none)")
    p.add_argument("--max-limits", type=int, default=None, metavar="N",
                   help="room for N limits in the kernel (default: max_limits in "
                        "chadthrottled.toml, else 16384); past it SetLimit answers "
                        "Unsupported and a rule's new process runs unlimited (journal)")
    p.add_argument("--config-dir", default=None, metavar="DIR",
                   help=f"configuration directory: the settings are DIR/{paths.SETTINGS_FILE}, "
                        f"permanent rules DIR/rules.d/*.toml "
                        f"(default: ${paths.ENV_CONFIG_DIR}, else {paths.DEFAULT_CONFIG_DIR})")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help=f"runtime state (limits and runtime rules kept across a restart) "
                        f"(default: ${paths.ENV_STATE_DIR}, else {paths.DEFAULT_STATE_DIR})")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = p.parse_args(argv)
    try:
        args.paths = paths.resolve(args.config_dir, args.state_dir, os.environ)
    except ValueError as e:
        p.error(str(e))
    return args


class Daemon:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = asyncio.Event()
        self.engine = None
        self.bus: MessageBus | None = None
        self.iface = None
        self.gate = None
        self.subs = None
        self.core = None
        self._watch = None
        self._wake = asyncio.Event()  # the sampler: something may need samples now
        self._subs_changed = asyncio.Event()  # the Stats loop: re-plan
        self._sampling: bool | None = None  # unknown until the sampler first looks
        self.metrics = None  # the metrics endpoint, when configured

    async def run(self) -> int:
        from ..engine import Engine
        from ..service.interface import Gate, Throttle1
        from ..service.polkit import Authorizer
        from ..service.subscriptions import Subscriptions
        from .core import Core
        from .dirwatch import DirWatch

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)

        notify("STATUS=loading the BPF programs")
        settings = getattr(self.args, "settings", None)
        self.engine = Engine(object_path=self.args.bpf_object, cgroup_root=self.args.cgroup_root,
                             monitor_root=self.args.monitor_all,
                             max_limits=settings.max_limits if settings else None)
        try:
            self.engine.open()
        except ChadthrottleError as e:
            log.error("cannot start: %s", e)
            notify(f"STATUS=cannot start: {e}")
            return EXIT_FAILURE
        try:
            notify("STATUS=restoring limits and rules")
            self.core = Core(self.engine, self.args.paths,
                             on_rules_changed=self._on_rules_changed)
            self.core.restore()
            self._watch = DirWatch(self.core.rules.refresh_kernel)
            self._on_rules_changed()
            settings = getattr(self.args, "settings", None)
            if settings is not None and settings.metrics is not None:
                notify("STATUS=starting the metrics endpoint")
                if not self._start_metrics(settings.metrics, loop):
                    return EXIT_FAILURE
            notify("STATUS=connecting to the system bus")
            self.bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
            _grow_send_buffer(self.bus)
            self.subs = Subscriptions(on_change=self._on_subscriptions_changed)
            self.iface = Throttle1(self.core, loop, subscriptions=self.subs, bus=self.bus,
                                   on_demand=self._wake.set)
            self.bus.export(names.OBJECT_PATH, self.iface)
            self.gate = Gate(self.bus, self.iface, Authorizer(self.bus))
            self.bus.add_message_handler(self.gate)
            await self._watch_name_owners()
            reply = await self.bus.request_name(names.BUS_NAME, NameFlag.DO_NOT_QUEUE)
            if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
                log.error("cannot own %s on the system bus: %s", names.BUS_NAME, reply.name)
                return EXIT_FAILURE
            loop.add_reader(self.engine.events_fd, self._on_events)
            log.info("chadthrottled %s serving %s; attached to %s", __version__,
                     names.BUS_NAME, ", ".join(self.engine.attached_cgroups) or "nothing yet")
            notify(f"READY=1\nSTATUS=serving {names.BUS_NAME}, 0 limits")
            tasks = [
                loop.create_task(self._sampler(), name="sample"),
                loop.create_task(self._stats_sender(), name="stats"),
                loop.create_task(self._every(DIAG_INTERVAL, self._diagnose), name="diag"),
                loop.create_task(self._every(DIAG_INTERVAL, self.engine.housekeeping),
                                 name="housekeeping"),
                loop.create_task(self._bus_watch(), name="bus"),
            ]
            if self.metrics is not None:
                tasks.append(loop.create_task(self.metrics.ticks(), name="metrics"))
            wd = watchdog_interval()
            if wd:
                tasks.append(loop.create_task(self._every(wd, self._watchdog), name="watchdog"))
            await self.stop.wait()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return self.exit_code
        finally:
            await self._shutdown()

    exit_code = EXIT_OK

    def _start_metrics(self, address, loop) -> bool:
        """Listen for scrapes; False (logged, with what to do) when it cannot."""
        from . import allow_ssl

        allow_ssl()  # prometheus_client imports ssl unconditionally
        from ..metrics.endpoint import MetricsEndpoint
        from ..metrics.gather import Gatherer

        gatherer = Gatherer(
            self.engine,
            rules=lambda: self.core.rules.rules.values(),
            bus_calls=lambda: dict(self.gate.calls) if self.gate is not None else {},
            subscribers=lambda: len(self.subs) if self.subs is not None else 0,
            sampling=lambda: bool(self._sampling))
        endpoint = MetricsEndpoint(address, gatherer, loop)
        try:
            endpoint.start()
        except OSError as e:
            hint = ""
            if e.errno == errno.EAFNOSUPPORT:
                hint = (" (the packaged unit allows AF_UNIX and AF_NETLINK sockets only: "
                        "install packaging/chadthrottled-metrics.conf as a drop-in, or "
                        "listen on unix:/PATH)")
            log.error("cannot serve metrics on %s: %s%s", address, e, hint)
            notify(f"STATUS=cannot serve metrics on {address}: {e}")
            return False
        self.metrics = endpoint
        return True

    def _on_signal(self, sig: int) -> None:
        log.info("%s: detaching and exiting", signal.Signals(sig).name)
        self.stop.set()

    def _on_reload(self) -> None:
        """SIGHUP, systemctl reload: re-read the permanent rules (a broken file changes
        nothing and is named in the journal)."""
        log.info("SIGHUP: reloading the rules")
        self._check_settings_file()
        if self.iface is None:
            return
        try:
            self.iface.reload()
        except ChadthrottleError:
            pass  # logged with the file and the key by the rule book
        except Exception:
            log.exception("reload failed")

    def _check_settings_file(self) -> None:
        """Settings are read at start only: say so when the file no longer matches."""
        started = getattr(self.args, "settings_file", None)
        try:
            now = config.load(self.args.paths.settings_file)
        except InvalidConfig as e:
            log.error("%s (the daemon keeps the settings it started with)", e)
            return
        if started is not None and now != started:
            log.warning("%s changed: the new settings take effect when the daemon restarts "
                        "(systemctl restart chadthrottled)", self.args.paths.settings_file)

    def _on_rules_changed(self) -> None:
        """Watch the directories of exe rules: a package upgrade that replaces a binary
        gives it a new inode, which the exec matcher must know."""
        if self._watch is not None and self.core is not None:
            self._watch.watch(self.core.rules.watch_dirs())

    async def _bus_watch(self) -> None:
        await self.bus.wait_for_disconnect()
        log.error("lost the system bus connection")
        self.exit_code = EXIT_FAILURE
        self.stop.set()

    async def _every(self, interval: float, fn) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                fn()
            except Exception:
                log.exception("periodic task %s failed", getattr(fn, "__name__", fn))

    async def _watch_name_owners(self) -> None:
        reply = await self.bus.call(Message(
            destination=names.BUS_DRIVER, path=names.BUS_DRIVER_PATH,
            interface=names.BUS_DRIVER, member="AddMatch", signature="s",
            body=[NAME_OWNER_CHANGED_RULE]))
        if reply.message_type is MessageType.ERROR:
            raise ChadthrottleError(f"cannot watch NameOwnerChanged: {reply.error_name}")

    def _on_subscriptions_changed(self) -> None:
        self._subs_changed.set()
        self._wake.set()

    def sampling_needed(self) -> bool:
        """A subscriber, a limit, --monitor-all, or a recent reader of rates."""
        return bool(len(self.subs) or len(self.engine.budgets)
                    or len(self.engine.units) or self.args.monitor_all
                    or time.monotonic() - self.iface.last_rate_read < READ_GRACE)

    async def _sampler(self) -> None:
        while True:
            self._wake.clear()
            needed = self.sampling_needed()
            if needed != self._sampling:
                self._sampling = needed
                log.info("sampling %s (%d subscriber(s), %d limit(s), %d unit limit(s))",
                         "on" if needed else "off", len(self.subs),
                         len(self.engine.budgets), len(self.engine.units))
            if not needed:
                await self._wake.wait()
                continue
            try:
                self._sample()
            except Exception:
                log.exception("periodic task _sample failed")
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def _stats_sender(self) -> None:
        """Stats to each subscriber when its interval is due."""
        while True:
            self._subs_changed.clear()
            nxt = self.subs.next_due()
            if nxt is None:
                await self._subs_changed.wait()
                continue
            delay = nxt - time.monotonic()
            if delay > 0:
                try:
                    await asyncio.wait_for(self._subs_changed.wait(), delay)
                except TimeoutError:
                    pass
                continue
            try:
                self.iface.send_stats(self.subs.take_due())
            except Exception:
                log.exception("sending Stats failed")

    def _sample(self) -> None:
        # per-process counters (the data behind top and Stats) while someone looks at them
        self.engine.sample(traffic=bool(
            self.args.monitor_all or len(self.subs)
            or time.monotonic() - self.iface.last_rate_read < READ_GRACE))

    def _on_events(self) -> None:
        """The kernel reported something (a limit's last process exited, a rule matched)."""
        try:
            notices = self.engine.handle_events()
        except Exception:
            log.exception("handling kernel events failed")
            return
        try:
            self.core.on_notices(notices)
        except Exception:
            log.exception("acting on kernel events failed")
        self.iface.announce(notices)

    def _diagnose(self) -> None:
        if self._diag is None:
            self._diag = Diagnostics(self.engine)
        n = len(self.engine.budgets.by_root)
        self._diag.emit()
        if self.engine.queues is not None:
            self.engine.queues.scan()  # uplinks that came up or went away
        notify(f"STATUS=serving {names.BUS_NAME}, {n} limits")

    _diag: Diagnostics | None = None

    def _watchdog(self) -> None:
        notify("WATCHDOG=1")

    async def _shutdown(self) -> None:
        notify("STOPPING=1\nSTATUS=detaching")
        if self.metrics is not None:
            try:
                self.metrics.close()
            except Exception:
                log.exception("closing the metrics endpoint failed")
            self.metrics = None
        if self.bus is not None and self.bus.connected:
            try:
                await asyncio.wait_for(self.bus.release_name(names.BUS_NAME), 2.0)
            except Exception:
                log.debug("release_name failed", exc_info=True)
            if self.gate is not None:
                self.bus.remove_message_handler(self.gate)
            self.bus.disconnect()
        if self._watch is not None:
            self._watch.close()
        if self.engine is not None and self.engine.kernel is not None:
            try:
                asyncio.get_running_loop().remove_reader(self.engine.events_fd)
            except Exception:
                log.debug("remove_reader failed", exc_info=True)
        if self.engine is not None:
            try:
                self.engine.close()
            except Exception:
                log.exception("engine close failed")
                self.exit_code = EXIT_FAILURE
        log.info("detached; bye")


def raise_fd_limit() -> int:
    """One pidfd per limit (plus our duplicate for the event loop): lift the soft
    RLIMIT_NOFILE to the hard one (asyncio uses epoll, so large fd numbers are fine)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def load_settings(args: argparse.Namespace, environ=os.environ) -> config.Effective:
    """The settings in force: the command line, then chadthrottled.toml, then the
    environment (InvalidConfig naming the file or option and the key)."""
    args.settings_file = config.load(args.paths.settings_file)
    eff = config.effective(args.settings_file, environ, log_level=args.log_level,
                           monitor_all=args.monitor_all, metrics_listen=args.metrics_listen,
                           max_limits=args.max_limits)
    args.settings = eff
    args.monitor_all = eff.monitor_all
    return eff


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    try:
        settings = load_settings(args)
    except InvalidConfig as e:
        print(f"chadthrottled: cannot start: {e}", file=sys.stderr)
        notify(f"STATUS=cannot start: {e}")
        return EXIT_NOT_CONFIGURED
    try:
        logsetup.setup(settings.log_level, args.log_target)
    except ValueError as e:
        print(f"chadthrottled: {e}", file=sys.stderr)
        return 2
    log.info("settings: %s", settings.describe())
    try:
        code = asyncio.run(Daemon(args).run())
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled in the loop
        code = EXIT_OK
    except Exception:
        log.exception("chadthrottled failed")
        code = EXIT_FAILURE
    logging.shutdown()
    return code


#: room for a burst of signals (10,000 limits ending at once is ~1.5 MB of LimitRemoved)
BUS_SNDBUF = 8 << 20


def _grow_send_buffer(bus) -> None:
    """dbus-fast treats EAGAIN on its non-blocking socket as a lost connection when a new
    message arrives while an earlier one is half written; a burst of signals that fills the
    kernel's send buffer then disconnects the daemon.  A large send buffer keeps bursts
    in the kernel.  SO_SNDBUFFORCE passes net.core.wmem_max (root with CAP_NET_ADMIN)."""
    import socket

    sock = getattr(bus, "_sock", None)
    if sock is None:
        return
    for opt in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
        if opt is None:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, BUS_SNDBUF)
            return
        except OSError:
            continue


if __name__ == "__main__":
    sys.exit(main())
