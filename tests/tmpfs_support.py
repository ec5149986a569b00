"""A small real file system to fill up: a tmpfs mounted for one test (Linux, as root).

Where mounting is not allowed (macOS, an unprivileged CI), `small_tmpfs` skips the test with
the reason; tests/test_disk_full.py then covers the same path with the injected fault
`disk_full@N` (worker/inject.py), which runs everywhere.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

CHUNK = 64 * 1024


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax: "4M") at `path`, unmounted afterwards (lazily if a
    process still holds a file there)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                              str(path)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'not root'}); "
                    "the injected disk_full@N test covers this path")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(ballast: Path, leave: int = 0) -> int:
    """Write `ballast` until its file system is full, then give back `leave` bytes; returns
    the ballast's size. A real ENOSPC ends the filling, not a computed size."""
    with open(ballast, "ab", buffering=0) as f:
        while True:
            try:
                if f.write(b"\0" * CHUNK) == 0:
                    break
            except OSError:
                break
    size = ballast.stat().st_size
    if leave:
        os.truncate(ballast, max(0, size - leave))
    return ballast.stat().st_size


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
