"""`chadthrottlectl run`: start a command that is limited from its first byte.

The child is forked and parks on a pipe *before* exec; the parent asks the daemon to limit
the child's pid (SetLimit covers the process and all its future descendants), and only then
releases it to exec the command.  So there is no unlimited burst at start, and children the
command forks are inside the same budget.  When the command ends, the parent clears the
limit while the exited child is still a zombie (so its pid cannot have been reused), reaps
it, and exits with its exit status (128+N when killed by signal N, as shells do).
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import sys
from collections.abc import Sequence

from chadthrottle import names
from chadthrottle.cli.client import Client, DaemonError
from chadthrottle.safetext import printable

GO = b"g"
EXIT_NOT_FOUND = 127
EXIT_NOT_EXECUTABLE = 126
_CHILD_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM,
                        signal.SIGHUP, signal.SIGQUIT)


class ExecFailed(Exception):
    def __init__(self, command: str, err: int) -> None:
        super().__init__(f"{command}: {os.strerror(err)}")
        self.errno = err
        self.exit_code = EXIT_NOT_FOUND if err == errno.ENOENT else EXIT_NOT_EXECUTABLE


def spawn_parked(argv: Sequence[str]) -> tuple[int, int, int]:
    """Fork a child that waits for GO on a pipe, then execs `argv`.

    Returns (pid, go_write_fd, exec_error_read_fd).  Closing go_write_fd without writing GO
    makes the child exit(1) without running anything.  exec_error_read_fd yields the errno
    as text if exec failed, EOF when exec succeeded (it is close-on-exec).
    """
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe-ish work, always ends in exec or _exit
        code = 1
        try:
            os.close(go_w)
            os.close(err_r)
            for sig in _CHILD_RESET_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            if os.read(go_r, 1) == GO:
                os.close(go_r)
                try:
                    os.execvp(argv[0], list(argv))
                except OSError as e:
                    os.write(err_w, str(e.errno or errno.ENOEXEC).encode())
                    code = EXIT_NOT_FOUND if e.errno == errno.ENOENT else EXIT_NOT_EXECUTABLE
        except BaseException:  # noqa: BLE001 - never return into the parent's code
            pass
        finally:
            os._exit(code)
    os.close(go_r)
    os.close(err_w)
    return pid, go_w, err_r


def exit_code_of(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


async def _wait_exit(pidfd: int) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(pidfd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(pidfd)


async def run_limited(client: Client, argv: Sequence[str], download: int, upload: int,
                      *, warn=None) -> int:
    """Run `argv` limited; returns the exit code.  Raises DaemonError if the limit could not
    be set (the command is then never executed) and ExecFailed if exec failed."""
    warn = warn or (lambda msg: print(f"chadthrottlectl: {printable(msg)}", file=sys.stderr))
    pid, go_w, err_r = spawn_parked(argv)
    pidfd = os.pidfd_open(pid)
    released = False
    loop = asyncio.get_running_loop()
    try:
        try:
            await client.set_limit(pid, download, upload)
        except BaseException:
            os.close(go_w)  # the child exits without running the command
            go_w = -1
            raise
        os.write(go_w, GO)
        os.close(go_w)
        go_w = -1
        released = True

        def forward(sig: int) -> None:
            try:
                os.kill(pid, sig)  # still our unreaped child: the pid cannot be reused
            except ProcessLookupError:
                pass

        def on_sigint() -> None:
            # On a terminal, Ctrl-C already reached the child (same process group).
            try:
                interactive = os.isatty(0)
            except OSError:
                interactive = False
            if not interactive:
                forward(signal.SIGINT)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, forward, sig)
        loop.add_signal_handler(signal.SIGINT, on_sigint)

        exec_error = os.read(err_r, 32)  # EOF once exec succeeded
        await _wait_exit(pidfd)
        # The child has exited but is not reaped: clear the limit now (the daemon may
        # already have dropped it on exit; that is fine).
        try:
            await client.clear_limit(pid)
        except DaemonError as e:
            if e.name not in (names.ERR_NO_SUCH_LIMIT, names.ERR_NO_SUCH_PROCESS):
                warn(f"could not clear the limit on {pid}: {e} [{e.name}]")
        _, status = os.waitpid(pid, 0)
        pid = -1
        if exec_error:
            raise ExecFailed(argv[0], int(exec_error.decode() or errno.ENOEXEC))
        return exit_code_of(status)
    finally:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if go_w >= 0:
            os.close(go_w)
        os.close(err_r)
        os.close(pidfd)
        if pid > 0:
            if released:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            os.waitpid(pid, 0)
