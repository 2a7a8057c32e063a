"""The daemon, chadthrottled.

It never speaks TLS (the bus and the journal are unix sockets, metrics are plain HTTP), yet
asyncio imports the ssl module when it can, and dbus-fast hashes introspection data with
hashlib, which prefers OpenSSL's digests: both load OpenSSL, about 6 MB of resident memory
for nothing.  Both modules are marked absent before anything imports them; asyncio imports
ssl optionally and hashlib falls back to Python's own sha256.  The one library that imports
ssl unconditionally is prometheus_client: :func:`allow_ssl` lifts the marks just before the
metrics endpoint, which is opt-in, is started.
"""

import sys

_WITHOUT_OPENSSL = ("ssl", "_hashlib")
for _name in _WITHOUT_OPENSSL:
    sys.modules.setdefault(_name, None)  # type: ignore[arg-type]


def allow_ssl() -> None:
    """Let the next ``import ssl`` load the real module."""
    for name in _WITHOUT_OPENSSL:
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]
