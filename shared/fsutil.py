"""Durable file writes (temp file, fsync, rename, directory fsync) and what a full disk looks
like to this project.

A crash (or SIGKILL, or power loss) at any instant leaves either the old file or the new
one on disk, never a torn mixture; a write that fails (a full disk) leaves the old file and
no temp file behind.

**A full disk** is an `OSError` with errno ENOSPC ("No space left on device") or EDQUOT
("Disk quota exceeded"), or MLX's `RuntimeError("[write] Unable to write N bytes to file.")`
from `mx.save_safetensors` (mlx/io/load.cpp: a short write(2); the errno is not kept, so
that one counts as a full disk only when the free space says so: `looks_full`). Messages
name the path, the free space and the file system (`describe_space`), from
`shutil.disk_usage` (statvfs: the space an unprivileged writer may use).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from shared import strictjson

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
MLX_WRITE_FAILED = "[write] Unable to write"  # mlx/io/load.cpp, FileWriter::write


def fsync_dir(path: Path) -> None:
    """Flush a directory entry so that a rename inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically. OSError (e.g. ENOSPC) when it cannot be
    written: `path` is left as it was and the temp file is removed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Strict JSON (non-finite floats become null: shared/strictjson.py), written atomically."""
    atomic_write_bytes(path, (strictjson.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_json_synced(path: Path, obj: Any) -> None:
    """Write JSON into a file inside a directory that is itself renamed into place later."""
    text = strictjson.dumps(obj, indent=2, sort_keys=True)  # before opening: no torn file
    with open(path, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- a full disk ----------------------------------------------------------------------------


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is ENOSPC/EDQUOT. MLX's
    "[write] Unable to write" is not decided here: see `looks_full`."""
    seen: BaseException | None = exc
    for _ in range(5):  # the cause chain, bounded
        if seen is None:
            return False
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def is_mlx_write_failure(exc: BaseException) -> bool:
    """MLX's short-write error (mx.save_safetensors / mx.save): no errno, no path."""
    return isinstance(exc, RuntimeError) and MLX_WRITE_FAILED in str(exc)


def looks_full(path: Path, needed: int) -> bool:
    """Whether the file system holding `path` has less than `needed` bytes free (at least
    one 4 KiB block: a write of anything needs one)."""
    free, _ = free_space(path)
    return free < max(needed, 4096)


def existing(path: Path) -> Path:
    """`path`, or its nearest ancestor that exists (what statvfs can be asked about)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


def free_space(path: Path) -> tuple[int, int]:
    """(free, total) bytes of the file system holding `path` (free: what an unprivileged
    writer may use, statvfs f_bavail). (0, 0) when it cannot be asked."""
    try:
        usage = shutil.disk_usage(existing(path))
    except OSError:
        return 0, 0
    return int(usage.free), int(usage.total)


def mount_point(path: Path) -> Path:
    """The mount point of the file system holding `path`."""
    p = existing(path).resolve()
    try:
        dev = p.stat().st_dev
        while p.parent != p and p.parent.stat().st_dev == dev:
            p = p.parent
    except OSError:
        pass
    return p


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"; binary units, as df -h."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover


def describe_space(path: Path) -> str:
    """"0 B free of 8.0 MiB on /mnt/runs" for the file system holding `path`."""
    free, total = free_space(path)
    return f"{human_bytes(free)} free of {human_bytes(total)} on {mount_point(path)}"


def disk_full_message(exc: BaseException, path: Path, what: str = "") -> str:
    """The one line for a write that failed for want of space: the file (the OSError's, else
    `path`), what was being written, the error, and the free space now."""
    where: Any = path
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.filename:
            where = seen.filename
            break
        seen = seen.__cause__ or seen.__context__
    err = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)).rstrip(".")
    doing = f"writing {what}; " if what else ""
    return f"disk full: {where}: {err} ({doing}{describe_space(path)})"


def quiet_unwritable_output() -> None:
    """Flush stdout and stderr; one that cannot be written (its file is on the full disk) is
    pointed at /dev/null, so that the interpreter's own flush at exit cannot fail again and
    turn a clean exit code into 1 or 120."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()  # the buffered bytes go to /dev/null now
