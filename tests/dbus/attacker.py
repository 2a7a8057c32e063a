"""What a hostile local user runs against the daemon (issue 7): each mode prints JSON lines
on stdout and waits for a word on stdin between steps, so the test drives the timing.

    zombies N          fork N children that exit at once, leave them unreaped
                       ("ready" {pid, zombies}); on "reap": reap them ("reaped")
    linger PORT UDP    UDP sockets and one TCP socket to 127.0.0.1:PORT with SO_LINGER
                       (1, 3600) and a full send buffer ("ready"); on "close": close the TCP
                       socket (this blocks the attacker, not anyone else)
    forkexit URL       fork a child; on "go" the parent exits and the child downloads URL to
                       /dev/null, reporting ("child" {pid}) then ("done" {bytes, seconds})
    scm-recv PATH S    listen on the unix socket PATH ("ready" {pid}), take one socket passed
                       over SCM_RIGHTS ("received"), and on "go" read from it for S seconds
                       ("done" {bytes, seconds})
    scm-send URL PATH  connect to URL, send the GET, pass the socket to PATH ("sent")
"""

from __future__ import annotations

import array
import json
import os
import resource
import socket
import struct
import sys
import time
import urllib.parse


def say(kind: str, **kw) -> None:
    print(json.dumps({"event": kind, **kw}), flush=True)


def wait_for(word: str) -> None:
    while True:
        line = sys.stdin.readline()
        if not line or line.strip() == word:
            return


def zombies(n: int) -> None:
    kids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        kids.append(pid)
    time.sleep(0.2)
    say("ready", pid=os.getpid(), zombies=kids)
    wait_for("reap")
    for k in kids:
        os.waitpid(k, 0)
    say("reaped")
    wait_for("exit")


def linger(port: int, udp: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    udps = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(udp)]
    t = socket.socket()
    t.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    t.connect(("127.0.0.1", port))
    t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 3600))
    t.setblocking(False)
    sent = 0
    while True:  # the peer never reads: fill what it and we can hold
        try:
            sent += t.send(b"x" * 65536)
        except BlockingIOError:
            break
    t.setblocking(True)
    say("ready", pid=os.getpid(), udp=len(udps), queued=sent)
    wait_for("close")
    t0 = time.monotonic()
    t.close()  # lingers: up to an hour, in this process
    say("closed", seconds=round(time.monotonic() - t0, 3))
    wait_for("exit")


def _get(url: str) -> socket.socket:
    u = urllib.parse.urlsplit(url)
    s = socket.create_connection((u.hostname, u.port or 80))
    s.sendall(f"GET {u.path} HTTP/1.0\r\nHost: {u.hostname}\r\n\r\n".encode())
    return s


def _drain(s: socket.socket, seconds: float) -> int:
    s.settimeout(1.0)
    got = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            b = s.recv(65536)
        except TimeoutError:
            continue
        if not b:
            break
        got += len(b)
    return got


def forkexit(url: str, seconds: float) -> None:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)  # the parent is gone now
        say("child", pid=os.getpid())
        s = _get(url)
        t0 = time.monotonic()
        got = _drain(s, seconds)
        say("done", bytes=got, seconds=round(time.monotonic() - t0, 3))
        os._exit(0)
    os.close(r)
    say("ready", pid=os.getpid(), child=pid)
    wait_for("go")
    os.write(w, b"g")
    os._exit(0)  # the parent exits; the child lives on


def scm_recv(path: str, seconds: float) -> None:
    """The limited process: takes a socket another process made, and reads from it."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    say("ready", pid=os.getpid())
    conn, _ = srv.accept()
    msg, anc, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(4))
    fd = array.array("i", anc[0][2][:4])[0]
    s = socket.socket(fileno=fd)
    say("received")
    wait_for("go")
    t0 = time.monotonic()
    got = _drain(s, seconds)
    say("done", bytes=got, seconds=round(time.monotonic() - t0, 3))
    wait_for("exit")


def scm_send(url: str, path: str) -> None:
    """An unlimited helper: makes the connection, sends the request, passes the socket."""
    s = _get(url)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    c.sendmsg([b"s"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [s.fileno()]))])
    s.close()
    say("sent", pid=os.getpid())
    wait_for("exit")


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "zombies":
        zombies(int(args[0]))
    elif mode == "linger":
        linger(int(args[0]), int(args[1]))
    elif mode == "forkexit":
        forkexit(args[0], float(args[1]))
    elif mode == "scm-recv":
        scm_recv(args[0], float(args[1]))
    elif mode == "scm-send":
        scm_send(args[0], args[1])
    else:
        raise SystemExit(f"unknown mode {mode}")
