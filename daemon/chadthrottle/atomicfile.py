"""Files the daemon writes: replaced atomically, so a reader (or the daemon after a crash)
sees the old content or the new one, never a part.

A write goes to a temporary file next to the target (``.<name>.tmp``: only the daemon's one
thread writes these directories, so a fixed name is enough, and opening it with O_NOFOLLOW
never follows a link someone left there), then is renamed over the target.  ``durable``
writes also fsync the file and the directory (permanent rules in /etc survive a power loss);
the runtime state in /run lives until reboot by design and needs only the rename.
Directories are made with their mode whatever the umask.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

FILE_MODE = 0o644
DIR_MODE = 0o755


def ensure_dir(path: Path, mode: int = DIR_MODE) -> None:
    """Create ``path`` and its missing parents with ``mode`` (whatever the umask)."""
    missing = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=mode)
        except FileExistsError:
            continue
        os.chmod(d, mode)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = FILE_MODE, *, durable: bool = True,
                 make_dir: bool = True) -> None:
    """Replace ``path`` with ``data`` (see the module's text); make_dir=False when the
    caller knows the directory exists."""
    path = Path(path)
    if make_dir:
        ensure_dir(path.parent)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_remove(path: Path, *, durable: bool = True) -> bool:
    """Remove ``path``; False if it did not exist."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    if durable:
        fsync_dir(Path(path).parent)
    return True
