"""A real bus client that floods chadthrottled, run as an unprivileged user by the tests.

    flood_client.py ADDRESS OWN_PID OTHER_PID [--connections N] [--reads N]
                    [--hostile-connections N] [--hostile N] [--own-calls N]

* ``--connections`` connections each keep ``--reads`` read calls in flight at once
  (GetStats of OWN_PID, ListLimits, ListProcesses, Properties.Get/GetAll), all started
  together;
* ``--hostile-connections`` connections each keep ``--hostile`` SetLimit calls on OTHER_PID
  (someone else's process: polkit must say no) in flight;
* meanwhile one more connection makes ``--own-calls`` SetLimit calls on OWN_PID one after
  the other (polkit rules allow limit-own), each after ``--pause`` seconds, interleaved
  with the flood.

Prints one JSON object: for each kind, a count of every answer ("ok" or the error name),
and the wall time.  Calls stay below dbus-daemon's default 128 pending replies per
connection, so every refusal comes from the daemon or its gate, not from our own bus quota.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

BUS_NAME = "org.chadthrottle.Throttle1"
PATH = "/org/chadthrottle/Throttle1"
IFACE = "org.chadthrottle.Throttle1"
PROPS = "org.freedesktop.DBus.Properties"
TIMEOUT = 120.0


def read_message(i: int, own_pid: int) -> Message:
    kind = i % 5
    if kind == 0:
        return Message(destination=BUS_NAME, path=PATH, interface=IFACE, member="GetStats",
                       signature="u", body=[own_pid])
    if kind == 1:
        return Message(destination=BUS_NAME, path=PATH, interface=IFACE, member="ListLimits")
    if kind == 2:
        return Message(destination=BUS_NAME, path=PATH, interface=IFACE,
                       member="ListProcesses")
    if kind == 3:
        return Message(destination=BUS_NAME, path=PATH, interface=PROPS, member="Get",
                       signature="ss", body=[IFACE, "Version"])
    return Message(destination=BUS_NAME, path=PATH, interface=PROPS, member="GetAll",
                   signature="s", body=[IFACE])


def set_limit(pid: int, down: int) -> Message:
    return Message(destination=BUS_NAME, path=PATH, interface=IFACE, member="SetLimit",
                   signature="utt", body=[pid, down, 0])


async def answer(bus: MessageBus, msg: Message) -> str:
    try:
        reply = await asyncio.wait_for(bus.call(msg), TIMEOUT)
    except TimeoutError:
        return "client-timeout"
    if reply.message_type is MessageType.ERROR:
        return reply.error_name or "?"
    return "ok"


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("own_pid", type=int)
    p.add_argument("other_pid", type=int)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--reads", type=int, default=125)
    p.add_argument("--hostile-connections", type=int, default=0)
    p.add_argument("--hostile", type=int, default=120)
    p.add_argument("--own-calls", type=int, default=18)
    p.add_argument("--pause", type=float, default=0.01, help="seconds before each own call")
    a = p.parse_args()

    async def connect() -> MessageBus:
        return await MessageBus(bus_address=a.address).connect()

    readers = [await connect() for _ in range(a.connections)]
    hostiles = [await connect() for _ in range(a.hostile_connections)]
    own = await connect()
    t0 = time.monotonic()
    flood = [asyncio.ensure_future(answer(bus, read_message(i, a.own_pid)))
             for bus in readers for i in range(a.reads)]
    hostile = [asyncio.ensure_future(answer(bus, set_limit(a.other_pid, 51200)))
               for bus in hostiles for _ in range(a.hostile)]
    own_results: list[str] = []
    own_latency: list[float] = []
    for i in range(a.own_calls):
        await asyncio.sleep(a.pause)  # let the flood's calls reach the daemon first
        t = time.monotonic()
        own_results.append(await answer(own, set_limit(a.own_pid, 51200 + 1024 * (i % 2))))
        own_latency.append(time.monotonic() - t)
    reads = await asyncio.gather(*flood)
    hostile_results = await asyncio.gather(*hostile)
    elapsed = time.monotonic() - t0
    for bus in (*readers, *hostiles, own):
        bus.disconnect()
    print(json.dumps({
        "reads": Counter(reads),
        "hostile": Counter(hostile_results),
        "own": Counter(own_results),
        "own_sequence": own_results,
        "own_max_seconds": round(max(own_latency, default=0.0), 3),
        "seconds": round(elapsed, 3),
    }))


if __name__ == "__main__":
    asyncio.run(main())
