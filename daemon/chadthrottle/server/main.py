"""chadthrottled: the root daemon serving org.chadthrottle.Throttle1 on the system bus.

Start-up order: open the engine (load + attach the BPF object), connect to the system bus
(``DBUS_SYSTEM_BUS_ADDRESS`` is honoured), export the object, install the gate, *then*
request the name, then tell systemd READY=1.  SIGTERM/SIGINT: release the name, detach
everything (engine.close()), exit 0.  SIGHUP (``systemctl reload``): re-read the
configuration; there is none to re-read yet, so it is logged and the daemon carries on (the
default action of SIGHUP would end it, and systemd counts that as a clean exit: no restart).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys

from dbus_fast import BusType, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.constants import NameFlag

from .. import __version__, names
from ..errors import ChadthrottleError
from . import log as logsetup
from .diagnostics import INTERVAL as DIAG_INTERVAL
from .diagnostics import Diagnostics
from .sdnotify import notify, watchdog_interval

log = logging.getLogger("chadthrottle.server")

SAMPLE_INTERVAL = 1.0
EXIT_OK = 0
EXIT_FAILURE = 1


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
    p.add_argument("--monitor-all", action="store_true",
                   default=os.environ.get("CHADTHROTTLE_MONITOR_ALL") == "1",
                   help="attach at the cgroup2 root at start, so ListProcesses (and "
                        "chadthrottlectl top) shows every process with traffic before any "
                        "limit is set; by default programs attach lazily, once per stable "
                        "parent cgroup of a limited process (also $CHADTHROTTLE_MONITOR_ALL=1)")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p.parse_args(argv)


class Daemon:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = asyncio.Event()
        self.engine = None
        self.bus: MessageBus | None = None
        self.iface = None
        self.gate = None

    async def run(self) -> int:
        from ..engine import Engine
        from ..service.interface import Gate, Throttle1
        from ..service.polkit import Authorizer

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)

        notify("STATUS=loading the BPF programs")
        self.engine = Engine(object_path=self.args.bpf_object, cgroup_root=self.args.cgroup_root,
                             monitor_root=self.args.monitor_all)
        try:
            self.engine.open()
        except ChadthrottleError as e:
            log.error("cannot start: %s", e)
            notify(f"STATUS=cannot start: {e}")
            return EXIT_FAILURE
        try:
            notify("STATUS=connecting to the system bus")
            self.bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
            _grow_send_buffer(self.bus)
            self.iface = Throttle1(self.engine, loop)
            self.bus.export(names.OBJECT_PATH, self.iface)
            self.gate = Gate(self.bus, self.iface, Authorizer(self.bus))
            self.bus.add_message_handler(self.gate)
            reply = await self.bus.request_name(names.BUS_NAME, NameFlag.DO_NOT_QUEUE)
            if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
                log.error("cannot own %s on the system bus: %s", names.BUS_NAME, reply.name)
                return EXIT_FAILURE
            log.info("chadthrottled %s serving %s; attached to %s", __version__,
                     names.BUS_NAME, ", ".join(self.engine.attached_cgroups) or "nothing yet")
            notify(f"READY=1\nSTATUS=serving {names.BUS_NAME}, 0 limits")
            tasks = [
                loop.create_task(self._every(SAMPLE_INTERVAL, self._sample), name="sample"),
                loop.create_task(self._every(DIAG_INTERVAL, self._diagnose), name="diag"),
                loop.create_task(self._bus_watch(), name="bus"),
            ]
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

    def _on_signal(self, sig: int) -> None:
        log.info("%s: detaching and exiting", signal.Signals(sig).name)
        self.stop.set()

    def _on_reload(self) -> None:
        log.info("SIGHUP: reload requested (no configuration to re-read yet)")

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

    def _sample(self) -> None:
        self.engine.sample()
        self.iface.reap()

    def _diagnose(self) -> None:
        if self._diag is None:
            self._diag = Diagnostics(self.engine)
        n = len(self.engine.list_limits())
        self._diag.emit()
        notify(f"STATUS=serving {names.BUS_NAME}, {n} limits")

    _diag: Diagnostics | None = None

    def _watchdog(self) -> None:
        notify("WATCHDOG=1")

    async def _shutdown(self) -> None:
        notify("STOPPING=1\nSTATUS=detaching")
        if self.bus is not None and self.bus.connected:
            try:
                await asyncio.wait_for(self.bus.release_name(names.BUS_NAME), 2.0)
            except Exception:
                log.debug("release_name failed", exc_info=True)
            if self.gate is not None:
                self.bus.remove_message_handler(self.gate)
            self.bus.disconnect()
        if self.iface is not None:
            self.iface.unwatch_all()
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    try:
        logsetup.setup(args.log_level, args.log_target)
    except ValueError as e:
        print(f"chadthrottled: {e}", file=sys.stderr)
        return 2
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
