"""A full disk for real: the run directory on a small tmpfs, filled and freed on cue.

`mount -t tmpfs` needs root (or CAP_SYS_ADMIN); where it is refused the campaign falls back
to the worker's `disk_full@N` injection when worker/inject.py has it, else skips the kind
and says why (`how_available`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from pathlib import Path

TMPFS_MB = 48
FILLER = "chaos-filler"


def mount_tmpfs(where: Path, size_mb: int = TMPFS_MB) -> str:
    """Mount a tmpfs of `size_mb` at `where` (created); '' on success, else why not."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755",
                               "tmpfs", str(where)], capture_output=True, text=True,
                              timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"mount -t tmpfs: {e}"
    if done.returncode != 0:
        return f"mount -t tmpfs: {(done.stderr or done.stdout).strip() or done.returncode}"
    return ""


def unmount(where: Path) -> None:
    """Unmount (lazily if something still holds it open); never raises."""
    for args in (["umount", str(where)], ["umount", "-l", str(where)]):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            if subprocess.run(args, capture_output=True, timeout=30,
                              check=False).returncode == 0:
                return


def tmpfs_allowed() -> str:
    """'' when this process may mount a tmpfs, else the reason it may not."""
    with tempfile.TemporaryDirectory(prefix="chaos-mount-probe-") as d:
        why = mount_tmpfs(Path(d), 1)
        if not why:
            unmount(Path(d))
        return why


def injection_available() -> bool:
    """Whether the worker knows a `disk_full@N` injection (another engineer adds it)."""
    from worker import inject  # no MLX import: plain Python

    return "disk_full" in getattr(inject, "KINDS", ())


def fill(mount: Path) -> int:
    """Fill the file system at `mount` to the last byte; returns the bytes written."""
    written = 0
    with open(mount / FILLER, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            block = b"\0" * chunk
            while True:
                try:
                    n = f.write(block)
                except OSError as e:
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        break
                    raise
                written += n or 0
                if not n:
                    break
    return written


def free(mount: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (mount / FILLER).unlink()


def free_bytes(mount: Path) -> int:
    st = os.statvfs(mount)
    return st.f_bavail * st.f_frsize

