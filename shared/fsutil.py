"""Durable file writes: temp file, fsync, rename, directory fsync.

A crash (or SIGKILL, or power loss) at any instant leaves either the old file or the new
one on disk, never a torn mixture.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from shared import strictjson


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
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
