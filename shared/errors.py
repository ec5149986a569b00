"""Domain exceptions. Messages say what was expected and what was found, and where."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shared.runlock import Holder


class OvernightError(Exception):
    """Base class: an error we expect and report in one line, without a traceback."""


class ConfigError(OvernightError):
    """A config file, override or command-line argument is unusable."""


class DataError(OvernightError):
    """A training or validation data file is unusable."""


class CheckpointError(OvernightError):
    """A checkpoint is missing, incomplete, corrupt or inconsistent."""


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


class RecordError(OvernightError):
    """A record one process wrote for others (run.json) is unreadable or not a valid record."""
