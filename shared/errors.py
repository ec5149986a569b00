"""Domain exceptions. Messages say what was expected and what was found, and where."""

from __future__ import annotations


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


class RunDirLocked(OvernightError):
    """Another supervisor holds the run directory."""


class RecordError(OvernightError):
    """A record one process wrote for others (run.json) is unreadable or not a valid record."""
