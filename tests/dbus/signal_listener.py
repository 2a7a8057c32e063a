"""A real bus client that adds match rules and prints every signal it receives.

    signal_listener.py ADDRESS RULE [RULE ...]

Prints ``{"ready": unique_name}`` once the rules are in place, then one JSON object per
signal: ``{"sender", "path", "interface", "member", "destination", "body"}``.  Runs until
killed (by its pid).  Used for the forged-signal and unicast tests.
"""

from __future__ import annotations

import asyncio
import json
import sys

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


async def main(address: str, rules: list[str]) -> None:
    bus = await MessageBus(bus_address=address).connect()

    def on_message(msg: Message):
        if msg.message_type is MessageType.SIGNAL and msg.interface != "org.freedesktop.DBus":
            print(json.dumps({"sender": msg.sender, "path": msg.path,
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
    print(json.dumps({"ready": bus.unique_name}), flush=True)
    await bus.wait_for_disconnect()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
