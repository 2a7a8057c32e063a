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

from ..procfs import terminate

CHUNK = 64 * 1024
_ZEROS = bytes(CHUNK)
#: started with (fd, argv...): waits for one byte on fd, then execs argv in the same pid, so
#: a limit can be set on the pid before the program sends its first packet
_GATE = ("import os, sys; r = int(sys.argv[1]); os.read(r, 1); os.close(r); "
         "os.execvp(sys.argv[2], sys.argv[2:])")


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
        progress = _progress_file()
        try:
            while got < n:
                b = self.rfile.read1(min(CHUNK, n - got))
                if not b:
                    break
                got += len(b)
                if progress is not None:  # (time, bytes so far): the receiver's own count
                    progress.write(f"{time.monotonic():.6f} {got}\n")
        except (ConnectionResetError, TimeoutError):
            pass
        finally:
            if progress is not None:
                progress.close()
        body = f"{got}\n".encode()
        try:  # a bounded client (curl --max-time) may be gone already
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_POST = _upload  # noqa: N815
    do_PUT = _upload  # noqa: N815


def _progress_file():
    """Where an upload's progress is written, when the server was asked to (env)."""
    path = os.environ.get("CHADTHROTTLE_BENCH_PROGRESS")
    return open(path, "a", buffering=1) if path else None  # noqa: SIM115 - closed by caller


def read_progress(path: str | os.PathLike, t0: float) -> list[tuple[float, int]]:
    """The (seconds since t0, bytes) an upload server wrote, for Transfer-like rates."""
    out = [(0.0, 0)]
    try:
        for line in Path(path).read_text().splitlines():
            t, n = line.split()
            out.append((float(t) - t0, int(n)))
    except FileNotFoundError:
        pass
    return out


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

    def __init__(self, host: str = "127.0.0.1", prefix: Sequence[str] = (),
                 progress: str | os.PathLike | None = None):
        """prefix: run the server through it (``ip netns exec NAME`` for another namespace);
        progress: uploads append "time bytes" lines to this file as they arrive."""
        self.host = host
        self.prefix = list(prefix)
        self.progress = progress
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def __enter__(self) -> HttpServer:
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "chadthrottle.bench.traffic", "serve",
             "--host", self.host], stdout=subprocess.PIPE, text=True,
            env=_env(CHADTHROTTLE_BENCH_PROGRESS=str(self.progress) if self.progress else ""))
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
        if self.proc:
            terminate(self.proc)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
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
            cmd = [sys.executable, "-c", _GATE, str(r), *self.argv]
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
        """Bytes the client had written by time t (seconds since start).  A step function:
        data arrives in lumps (64 KB segments on loopback) and interpolating between reads
        would smear a lump that arrived later into an earlier window."""
        got = 0
        for when, total in self.samples:
            if when > t:
                break
            got = total
        return got

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
        terminate(self.proc)
        if self._reader.is_alive():
            self._reader.join(2)
        return self.proc.returncode

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def curl_download(url: str, seconds: float) -> list[str]:
    """curl writing the body to stdout (unbuffered), bounded by --max-time."""
    return ["curl", "-sS", "-N", "--max-time", str(int(seconds) + 1), "-o", "-", url]


def curl_upload(url: str, path: str | os.PathLike, seconds: float) -> list[str]:
    """curl sending a file (PUT, with its length, without waiting for "100 Continue"),
    bounded by --max-time."""
    return ["curl", "-sS", "-H", "Expect:", "--max-time", str(int(seconds) + 1),
            "-o", "/dev/null", "-T", str(path), url]


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
    f = sub.add_parser("fetch", help="download URL to stdout, paced by the reader")
    f.add_argument("url")
    f.add_argument("--rate", type=int, required=True, help="bytes per second")
    f.add_argument("--seconds", type=float, required=True)
    a = ap.parse_args(argv)
    if a.cmd == "serve":
        serve(a.host, a.port)
    elif a.cmd == "fetch":
        fetch(a.url, a.rate, a.seconds)


def fetch(url: str, rate: int, seconds: float) -> None:
    """A client that paces itself by reading slowly (TCP's window does the rest): a
    steady, self-limited flow for tests of connections that exist before a limit."""
    import urllib.request

    out = sys.stdout.buffer
    t0 = time.monotonic()
    got = 0
    step = max(rate // 50, 1024)  # 20 ms worth of data per read
    with urllib.request.urlopen(url, timeout=seconds + 5) as resp:
        while time.monotonic() - t0 < seconds:
            b = resp.read(step)
            if not b:
                break
            out.write(b)
            out.flush()
            got += len(b)
            ahead = got / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)


def paced_download(url: str, rate: int, seconds: float) -> list[str]:
    return [sys.executable, "-m", "chadthrottle.bench.traffic", "fetch", url, "--rate",
            str(rate), "--seconds", str(seconds)]


if __name__ == "__main__":
    main()


def free_port(host: str = "127.0.0.1") -> int:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Iperf3:
    """iperf3 (the Debian package) on loopback: a one-off server and a client started
    paused, so a limit can be set on the client's pid before its first packet.

    ``reverse``: the server sends (the client downloads).  The result's ``intervals`` are
    the *receiver's* per-interval bytes (server's own report when uploading)."""

    def __init__(self, *, seconds: float, reverse: bool = False, udp_bps: int = 0,
                 host: str = "127.0.0.1", interval: float = 0.25, extra: Sequence[str] = ()):
        self.host = host
        self.port = free_port(host)
        self.server = subprocess.Popen(
            ["iperf3", "-s", "-1", "-J", "-B", host, "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_listening(host, self.port, self.server)
        argv = ["iperf3", "-c", host, "-p", str(self.port), "-t", str(seconds), "-J",
                "-i", str(interval), "--get-server-output", *extra]
        if reverse:
            argv.append("-R")
        if udp_bps:
            argv += ["-u", "-b", str(udp_bps * 8)]
        self.reverse = reverse
        self.seconds = seconds
        r, w = os.pipe()
        self.client = subprocess.Popen([sys.executable, "-c", _GATE, str(r), *argv],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       pass_fds=(r,), text=True)
        os.close(r)
        self._gate_w: int | None = w
        self._released = 0.0
        self.pid = self.client.pid

    def release(self) -> None:
        if self._gate_w is not None:
            os.write(self._gate_w, b"g")
            os.close(self._gate_w)
            self._gate_w = None
            self._released = time.monotonic()

    def wait_test_end(self) -> None:
        """Sleep until the measured part of the test is over.  Callers then lift the limit:
        iperf3 ends a test over its control connection, which shares the client's budget
        with a data connection whose backlog can starve it for a long time at low rates."""
        self.release()
        time.sleep(max(0.0, self._released + self.seconds + 0.5 - time.monotonic()))

    def result(self) -> dict:
        """Wait for the client; JSON with 'intervals' [(t_end, bytes)] of the receiver,
        'retransmits' and the raw report."""
        import json

        self.release()
        timed_out = False
        try:
            out, err = self.client.communicate(timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            timed_out = True
            self.client.kill()
            out, err = self.client.communicate()
        rep = json.loads(out) if out.strip().startswith("{") else {}
        if "error" in rep or not rep:
            why = rep.get("error") or err.strip() or out.strip()[-300:] or "no output"
            raise RuntimeError(f"iperf3 client failed (exit {self.client.returncode}"
                               f"{', timed out' if timed_out else ''}): {why}")
        if self.reverse:
            ivals = rep["intervals"]
        else:
            ivals = rep.get("server_output_json", {}).get("intervals") or rep["intervals"]
        series = [(iv["sum"]["end"], iv["sum"]["bytes"]) for iv in ivals]
        end = rep.get("end", {})
        retr = end.get("sum_sent", {}).get("retransmits", 0) or 0
        return {"intervals": series, "retransmits": retr, "report": rep}

    def close(self) -> None:
        if self._gate_w is not None:
            os.close(self._gate_w)
            self._gate_w = None
        for p in (self.client, self.server):
            terminate(p)

    def __enter__(self) -> Iperf3:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def series_rate(intervals: Sequence[tuple[float, int]], t_from: float, t_to: float) -> float:
    """Average rate over the intervals [(t_end, bytes)] that lie inside [t_from, t_to]
    (a longer last interval, such as iperf3's report of the test's tail, is left out)."""
    total = 0.0
    covered = 0.0
    prev_end = 0.0
    for end, nbytes in intervals:
        start, prev_end = prev_end, end
        if start >= t_from - 1e-3 and end <= t_to + 0.05:
            total += nbytes
            covered += end - start
    return total / covered if covered > 0 else 0.0


def _listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _wait_listening(host: str, port: int, proc: subprocess.Popen, timeout: float = 5) -> None:
    """Wait for the LISTEN socket without connecting (iperf3 -1 would count a probe)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("iperf3 server exited")
        if _listening(port):
            return
        time.sleep(0.05)
    raise RuntimeError(f"iperf3 server did not listen on {host} port {port}")
