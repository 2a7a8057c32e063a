"""A real bus client that adds match rules and prints every signal it receives.

    signal_listener.py ADDRESS [--subscribe MS] RULE [RULE ...]

Prints ``{"ready": unique_name}`` once the rules are in place (and, with ``--subscribe``,
after its Subscribe(MS) call was answered: ``"subscribed"`` holds the answer), then one
JSON object per signal: ``{"t", "sender", "path", "interface", "member", "destination",
"body"}`` (t: monotonic seconds).  Runs until killed (by its pid).  Used for the
forged-signal, unicast and subscriber tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus


def plain(value):
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


async def main(address: str, rules: list[str], subscribe: int | None) -> None:
    bus = await MessageBus(bus_address=address).connect()

    def on_message(msg: Message):
        if msg.message_type is MessageType.SIGNAL and msg.interface != "org.freedesktop.DBus":
            print(json.dumps({"t": time.monotonic(), "sender": msg.sender, "path": msg.path,
                              "interface": msg.interface, "member": msg.member,
                              "destination": msg.destination, "body": plain(msg.body)}),
                  flush=True)
        return None

    bus.add_message_handler(on_message)
    for rule in rules:
        reply = await bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s", body=[rule]))
        if reply.message_type is MessageType.ERROR:
            print(json.dumps({"error": reply.error_name, "rule": rule}), flush=True)
            sys.exit(1)
    ready: dict = {"ready": bus.unique_name}
    if subscribe is not None:
        reply = await bus.call(Message(
            destination="org.chadthrottle.Throttle1", path="/org/chadthrottle/Throttle1",
            interface="org.chadthrottle.Throttle1", member="Subscribe", signature="u",
            body=[subscribe]))
        ready["subscribed"] = reply.error_name or "ok"
    print(json.dumps(ready), flush=True)
    await bus.wait_for_disconnect()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("--subscribe", type=int, default=None, metavar="MS")
    p.add_argument("rules", nargs="*")
    a = p.parse_intermixed_args()
    asyncio.run(main(a.address, a.rules, a.subscribe))
