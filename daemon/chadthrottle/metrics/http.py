"""The HTTP side of the metrics endpoint: a small threaded server on an IP address and port,
or on a unix socket, serving ``prometheus_client``'s WSGI application.

The application negotiates the format (OpenMetrics 1.0 when the scraper asks for it with
``Accept: application/openmetrics-text``, the Prometheus text format 0.0.4 otherwise) and
gzip.  Every path answers with the metrics (``/metrics`` is the one to use).  A scrape whose
figures the daemon cannot give in time gets ``503 Service Unavailable``.

Threads: one accepts connections, one more per request (daemon threads); a connection that
sends nothing for REQUEST_TIMEOUT seconds is closed.  These threads never touch the engine
(see :mod:`chadthrottle.metrics.source`).

A unix socket is made world-connectable (0666): the figures are those every local user can
already read on the bus (reads are open).  Put it in a directory of restricted access to
keep it to some users.  A stale socket left by a crashed run is replaced; any other file
at that path is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from ..config import ListenAddress
from ..errors import MetricsUnavailable

log = logging.getLogger("chadthrottle.metrics")

REQUEST_TIMEOUT = 10.0
UNIX_SOCKET_MODE = 0o666


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT  # socketserver.StreamRequestHandler: per-connection timeout

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base's name
        log.debug("metrics request: " + format, *args)

    def address_string(self) -> str:
        return str(self.client_address[0]) if self.client_address else "unix"


class _TCPServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        # WSGIServer's would resolve the address's host name (socket.getfqdn): no lookups
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()


class _TCP6Server(_TCPServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingMixIn, WSGIServer):
    address_family = socket.AF_UNIX
    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "localhost", 0
        self.setup_environ()

    def get_request(self):
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


def unavailable_guard(app: Callable) -> Callable:
    """The WSGI app, answering 503 when the daemon cannot give its figures."""

    def guarded(environ, start_response):
        try:
            return app(environ, start_response)
        except MetricsUnavailable as e:
            body = f"# metrics unavailable: {e}\n".encode()
            start_response("503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8"), ("Retry-After", "5")])
            return [body]

    return guarded


def _prepare_unix_path(path: Path) -> None:
    """The directory exists (made if its parent does); a stale socket goes; a file that is
    not a socket stays and is an error."""
    path.parent.mkdir(mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    path.unlink()


class MetricsServer:
    """Listens on ``address`` and serves ``app`` (a WSGI application) in threads."""

    def __init__(self, address: ListenAddress, app: Callable) -> None:
        self.address = address
        self._app = unavailable_guard(app)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._inode: tuple[int, int] | None = None

    def start(self) -> None:
        """Bind and listen (OSError when that fails), then serve on a thread."""
        a = self.address
        if a.is_unix:
            path = Path(a.path)
            _prepare_unix_path(path)
            server: WSGIServer = _UnixServer(a.path, _Handler)
            st = os.stat(path)
            self._inode = (st.st_dev, st.st_ino)
            os.chmod(path, UNIX_SOCKET_MODE)
        else:
            cls = _TCP6Server if ":" in a.host else _TCPServer
            server = cls((a.host, a.port), _Handler)
        server.set_app(self._app)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="metrics-http",
                                        kwargs={"poll_interval": 0.5}, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The TCP port listened on (0 for a unix socket)."""
        if self._server is None or self.address.is_unix:
            return 0
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop accepting, close the socket, remove the unix socket this run made."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        if self.address.is_unix and self._inode is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self.address.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.address.path)
