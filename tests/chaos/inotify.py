"""Linux inotify through ctypes: hear a file appear within microseconds, without polling.

Used to SIGKILL a worker in the middle of a checkpoint write: a tiny model's checkpoint takes
~4 ms to write (files, fsyncs, manifest, rename), far too short to hit by polling a
directory listing, but `IN_CREATE` of the writer's `checkpoints/.tmp-step-…-<pid>/`
directory arrives while the write has just begun (inotify(7); the event layout is
`struct inotify_event {int wd; uint32_t mask, cookie, len; char name[len];}`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

IN_CREATE = 0x00000100
IN_MOVED_TO = 0x00000080
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


class Inotify:
    """Watch one directory for entries created in (or moved into) it.

    Raises OSError when inotify is unavailable (not Linux, or out of watches)."""

    def __init__(self, directory: Path, mask: int = IN_CREATE | IN_MOVED_TO) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        wd = libc.inotify_add_watch(self._fd, str(directory).encode(), mask)
        if wd < 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"inotify_add_watch {directory}: {os.strerror(err)}")

    def wait_for(self, accept: Callable[[str], bool], timeout: float) -> str | None:
        """The first created name for which `accept(name)` is true, or None after `timeout`
        seconds."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not poller.poll(left * 1000):
                continue
            try:
                buf = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            except OSError as e:  # pragma: no cover - EINTR is retried by Python
                if e.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            while offset + _EVENT.size <= len(buf):
                _wd, _mask, _cookie, length = _EVENT.unpack_from(buf, offset)
                raw = buf[offset + _EVENT.size: offset + _EVENT.size + length]
                offset += _EVENT.size + length
                name = raw.split(b"\0", 1)[0].decode(errors="replace")
                if name and accept(name):
                    return name

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
