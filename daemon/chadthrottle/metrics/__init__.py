"""The opt-in OpenMetrics/Prometheus endpoint (``[metrics] listen`` in chadthrottled.toml).

* snapshot.py   what one scrape shows: plain immutable data
* gather.py     the event loop's side: reads the engine, builds a snapshot
* source.py     the one crossing between threads (the ownership rule)
* collector.py  a snapshot as metric families
* mapfill.py    entries against max_entries of the BPF object's maps
* http.py       the threaded HTTP server, on an IP address and port or a unix socket
* endpoint.py   all of it as the daemon runs it

``prometheus_client`` is imported by these modules only, and the daemon imports them only
when metrics are configured.
"""
