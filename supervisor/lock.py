"""One supervisor per run directory: an exclusive, non-blocking flock on RUN_DIR/supervisor.lock.

The lock file holds the holder's PID (for the refusal message and for `overnight status`).
The kernel releases a flock when its holder dies, however it dies, so a stale lock file never
blocks a restarted supervisor.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from shared.errors import RunDirLocked


class RunLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise RunDirLocked naming the holder's PID."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_holder(self.path)
            who = f"supervisor PID {holder}" if holder else "another supervisor"
            raise RunDirLocked(
                f"{self.path.parent}: run directory is locked by {who} ({self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holder(path: Path) -> int | None:
    """The PID written by the last holder (it may be gone: check with is_locked)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def is_locked(path: Path) -> bool:
    """Whether a live supervisor holds the lock (probe with a shared lock, released at once)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
