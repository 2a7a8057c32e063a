"""Real traffic for tests and benchmarks, bounded in bytes and time.

* ``HttpServer``: a separate process serving ``GET /bytes/N`` (N zero bytes) and
  accepting ``POST``/``PUT`` uploads, on 127.0.0.1 or ::1.
* ``Transfer``: a real client (curl, or anything else writing to stdout) whose output is
  counted here with timestamps, so the achieved rate over time is measured outside the
  program under test.
* ``retransmits()``: the kernel's TCP retransmit counter (loopback only here).

``python -m chadthrottle.bench.traffic serve`` runs the server (used by HttpServer).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHUNK = 64 * 1024
_ZEROS = bytes(CHUNK)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        parts = self.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "bytes" or not parts[1].isdigit():
            self.send_error(404)
            return
        n = int(parts[1])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        try:
            while n > 0:
                k = min(n, CHUNK)
                self.wfile.write(_ZEROS[:k])
                n -= k
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _upload(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        got = 0
        try:
            while got < n:
                b = self.rfile.read(min(CHUNK, n - got))
                if not b:
                    break
                got += len(b)
        except (ConnectionResetError, TimeoutError):
            pass
        body = f"{got}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = _upload  # noqa: N815
    do_PUT = _upload  # noqa: N815


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def serve(host: str, port: int) -> None:
    cls = _V6Server if ":" in host else ThreadingHTTPServer
    cls.daemon_threads = True
    srv = cls((host, port), _Handler)
    print(srv.server_address[1], flush=True)
    signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
    srv.serve_forever()


class HttpServer:
    """The server in its own process (so it is never part of the process under test)."""

    def __init__(self, host: str = "127.0.0.1"):
        self.host = host
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> HttpServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chadthrottle.bench.traffic", "serve", "--host", self.host],
            stdout=subprocess.PIPE, text=True, env=_env())
        assert self.proc.stdout
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.__exit__()
            raise RuntimeError("HTTP test server did not start")
        self.port = int(line)
        return self

    def url(self, nbytes: int) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}/bytes/{nbytes}"

    def upload_url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}/upload"

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class Transfer:
    """Run a client whose stdout is the received data; count bytes per time bin.

    The client is started stopped-before-exec when ``start_paused`` is set: it waits on a
    pipe until ``release()``, so a limit can be set on its pid before its first packet.
    """

    def __init__(self, argv: Sequence[str], *, max_seconds: float, start_paused: bool = False,
                 stdin: int | None = None):
        self.argv = list(argv)
        self.max_seconds = max_seconds
        self.samples: list[tuple[float, int]] = []  # (seconds since start, total bytes)
        self.total = 0
        self.t0 = 0.0
        self._gate_w: int | None = None
        if start_paused:
            r, w = os.pipe()
            self._gate_w = w
            # a tiny gate reads one byte, then execs the client (same pid)
            gate = ("import os, sys; r = int(sys.argv[1]); os.read(r, 1); os.close(r); "
                    "os.execvp(sys.argv[2], sys.argv[2:])")
            cmd = [sys.executable, "-c", gate, str(r), *self.argv]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=stdin,
                                         pass_fds=(r,))
            os.close(r)
        else:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stdin=stdin)
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._started = threading.Event()
        if not start_paused:
            self._begin()

    def release(self) -> None:
        if self._gate_w is not None:
            os.write(self._gate_w, b"go\n")
            os.close(self._gate_w)
            self._gate_w = None
            self._begin()

    def _begin(self) -> None:
        self.t0 = time.monotonic()
        self.samples.append((0.0, 0))
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout
        fd = self.proc.stdout.fileno()
        while True:
            try:
                b = os.read(fd, CHUNK)
            except OSError:
                break
            if not b:
                break
            self.total += len(b)
            self.samples.append((time.monotonic() - self.t0, self.total))
            if time.monotonic() - self.t0 > self.max_seconds:
                break

    def bytes_at(self, t: float) -> int:
        """Bytes received by time t (seconds since start), interpolated."""
        prev = (0.0, 0)
        for s in self.samples:
            if s[0] >= t:
                if s[0] == prev[0]:
                    return s[1]
                return int(prev[1] + (s[1] - prev[1]) * (t - prev[0]) / (s[0] - prev[0]))
            prev = s
        return prev[1]

    def rate(self, t_from: float, t_to: float) -> float:
        return (self.bytes_at(t_to) - self.bytes_at(t_from)) / (t_to - t_from)

    def wait(self, timeout: float | None = None) -> int:
        timeout = self.max_seconds + 5 if timeout is None else timeout
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.stop()
        finally:
            self._reader.join(2)

    def stop(self) -> int:
        if self._gate_w is not None:
            os.close(self._gate_w)
            self._gate_w = None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader.is_alive():
            self._reader.join(2)
        return self.proc.returncode

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def curl_download(url: str, seconds: float) -> list[str]:
    """curl writing the body to stdout, bounded by --max-time."""
    return ["curl", "-sS", "--max-time", str(int(seconds) + 1), "-o", "-", url]


def retransmits() -> int:
    """The kernel's TCP RetransSegs counter (this network namespace)."""
    lines = Path("/proc/net/snmp").read_text().splitlines()
    tcp = [ln.split() for ln in lines if ln.startswith("Tcp:")]
    return int(tcp[1][tcp[0].index("RetransSegs")])


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="chadthrottle.bench.traffic")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        serve(a.host, a.port)


if __name__ == "__main__":
    main()
