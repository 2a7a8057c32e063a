"""The daemon, chadthrottled.

It never speaks TLS (the bus and the journal are unix sockets, metrics are plain HTTP), but
asyncio imports the ssl module when it can, and with it OpenSSL: ~6.6 MB of resident memory
for nothing.  The module is marked absent before anything imports asyncio; asyncio, http and
prometheus_client all work without it (they import it optionally).
"""

import sys

sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
