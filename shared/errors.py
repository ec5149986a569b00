"""Domain exceptions. Messages say what was expected and what was found, and where."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from shared.runlock import Holder


class OvernightError(Exception):
    """Base class: an error we expect and report in one line, without a traceback."""


class ConfigError(OvernightError):
    """A config file, override or command-line argument is unusable."""


class DataError(OvernightError):
    """A training or validation data file is unusable."""


class CheckpointError(OvernightError):
    """A checkpoint is missing, incomplete, corrupt or inconsistent."""


class CheckpointRefused(CheckpointError):
    """The checkpoint a worker was told to resume from (`path`) cannot be resumed from: it
    fails validation, or its tensors do not fit the model. The checkpoint's fault, not the
    config's: the worker exits CHECKPOINT_REFUSED (shared/exitcodes.py) and the supervisor
    quarantines it and resumes from the next older valid one."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"checkpoint {path.name} refused: {reason}")
        self.path = path


class ProtocolError(OvernightError):
    """A message on a socket is not valid JSON of a known, well-formed type."""


class RunDirError(OvernightError):
    """A run directory cannot be created or written (read-only file system, a parent that is a
    file, permission denied); the message names the path."""


class RunDirLocked(OvernightError):
    """Another process (a supervisor or a worker) holds the run directory's lock.

    `holder`: who the lock file names (None if unknown)."""

    def __init__(self, message: str, holder: Holder | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class DiskFull(OvernightError):
    """A write failed for want of space (ENOSPC, EDQUOT, MLX's short write); the message
    names the file, what was written and the free space (shared/fsutil.py)."""


class SystemLimitError(OvernightError):
    """The machine's limits cannot run the worker (a hard open-file limit below what mlx_lm
    sets); the message names the limit and how to raise it (shared/openfile_limit.py)."""


class RecordError(OvernightError):
    """A record one process wrote for others (run.json) is unreadable or not a valid record."""
