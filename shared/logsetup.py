"""Configure structlog once per process: JSON lines to a rotating file, people-readable console.

Events are snake_case facts (`worker_spawned`, `checkpoint_saved`) with data as fields.
`run_id`, `pid` and (in the worker) `attempt`/`step` are bound with contextvars so that every
line carries them.

The JSON file survives a failing disk (`TolerantFileHandler`): a line that cannot be written
(ENOSPC, EDQUOT, a file system gone read-only) never raises into the process nor prints a
traceback per line; it is kept in memory with the lines after it (up to 8 MiB, then counted
and dropped), the failure is said once on stderr, and the file is tried again with a backoff
(1 s doubling to 60 s) at later lines. When it can be written again the kept lines go out in
order, then a `log_lines_dropped` line if any were dropped. Lines are written unbuffered and
never torn: a partial write keeps its unwritten tail for the next try. The console still
gets every line meanwhile.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import logging.handlers
import os
import sys
import time
from collections import deque
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog

from shared import strictjson

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]




def _drop_console_noise(_: Any, __: str,
                        event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The console is one process's own output: its pid, run id and source go without saying."""
    for key in ("pid", "run_id", "source", "logger"):
        event_dict.pop(key, None)
    return event_dict


class _SkipEvents(logging.Filter):
    """Keep chatty events (already shown another way) off the console; files get them all."""

    def __init__(self, events: frozenset[str]):
        super().__init__()
        self.events = events

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg
        return not (isinstance(msg, dict) and msg.get("event") in self.events)


RETRY_FIRST = 1.0  # seconds before a failed log file is tried again
RETRY_MAX = 60.0
MAX_PENDING_BYTES = 8 * 2**20  # lines kept in memory while the file cannot be written


class TolerantFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log file that a failing write does not break (see the module docstring).

    `dropped`: lines lost so far beyond MAX_PENDING_BYTES; `failed_writes`: consecutive
    failed tries (0: the file is up to date)."""

    def __init__(self, path: Path, max_bytes: int, backups: int, source: str) -> None:
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, delay=True)
        self.source = source
        self.pending: deque[bytes] = deque()
        self.pending_bytes = 0
        self.dropped = 0
        self.failed_writes = 0
        self.retry_at = 0.0

    def _open(self) -> Any:
        return open(self.baseFilename, "ab", buffering=0)  # raw: a write says what it wrote

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
        except Exception:
            self.handleError(record)
            return
        if self.pending_bytes + len(data) > MAX_PENDING_BYTES:
            self.dropped += 1
        else:
            self.pending.append(data)
            self.pending_bytes += len(data)
        if self.failed_writes and time.monotonic() < self.retry_at:
            return
        self._write_pending(record)

    def _write_pending(self, record: logging.LogRecord | None) -> None:
        """Write the kept lines in order (then the dropped-lines note); on failure keep the
        rest and back off. `record`: the one being emitted (for the rollover check)."""
        kept, dropped = len(self.pending), self.dropped
        try:
            if record is not None and self.shouldRollover(record):
                self.doRollover()
            if self.stream is None:
                self.stream = self._open()
            stream: Any = self.stream  # a raw binary file (_open)
            while self.pending or self.dropped:
                if not self.pending:  # everything kept is out: now say what was not
                    self.pending.append(self._dropped_line())
                    self.dropped = 0
                data = self.pending[0]
                n = stream.write(data) or 0
                if n <= 0:
                    raise OSError(f"wrote nothing to {self.baseFilename}")
                self.pending_bytes -= min(n, len(data))
                if n < len(data):
                    self.pending[0] = data[n:]  # never torn: the rest goes next
                else:
                    self.pending.popleft()
        except OSError as e:
            self._failed(e)
            return
        if self.failed_writes:
            _say(f"overnight: {self.baseFilename} written again ({kept} lines kept in memory "
                 f"written, {dropped} dropped)")
        self.failed_writes = 0

    def _failed(self, e: OSError) -> None:
        if self.stream is not None:
            with contextlib.suppress(OSError):
                self.stream.close()
            self.stream = None
        self.failed_writes += 1
        self.retry_at = time.monotonic() + min(RETRY_MAX,
                                               RETRY_FIRST * 2 ** (self.failed_writes - 1))
        if self.failed_writes == 1:
            _say(f"overnight: cannot write {self.baseFilename} ({e.strerror or e}); log lines "
                 f"are kept in memory (up to {MAX_PENDING_BYTES // 2**20} MiB) and written "
                 "when it can be; the console still shows them")

    def _dropped_line(self) -> bytes:
        event = {"event": "log_lines_dropped", "level": "warning", "count": self.dropped,
                 "detail": f"{self.dropped} log lines did not fit in memory while "
                           f"{self.baseFilename} could not be written",
                 "source": self.source, "pid": os.getpid(),
                 "timestamp": dt.datetime.now(dt.timezone.utc).isoformat()}
        return (strictjson.dumps(event) + "\n").encode()

    def flush(self) -> None:
        """Nothing waits in a stream buffer (writes are unbuffered); kept lines wait for the
        next try."""

    def close(self) -> None:
        """One last try for the kept lines, then close."""
        if self.pending or self.dropped:
            self._write_pending(None)
        super().close()


def _say(line: str) -> None:
    """One line on stderr, itself maybe unwritable (then lost, never fatal)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


def configure(
    source: str,
    json_path: Path | None,
    console: bool = True,
    level: str = "info",
    max_bytes: int = 50_000_000,
    backups: int = 5,
    console_stream: Any = None,
    console_skip: frozenset[str] = frozenset(),
) -> None:
    """Set up logging for a process; `source` ("worker"/"supervisor"/"cli") is on every line."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(getattr(logging, level.upper()))
    pre_chain = [*_SHARED, structlog.stdlib.ExtraAdder()]
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        fh = TolerantFileHandler(json_path, max_bytes, backups, source)
        fh.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=pre_chain,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.dict_tracebacks,
                    # strict JSON lines: a NaN field is written as null (shared/strictjson.py)
                    structlog.processors.JSONRenderer(serializer=strictjson.dumps),
                ],
            )
        )
        root.addHandler(fh)
    if console:
        stream = console_stream or sys.stderr
        colors = hasattr(stream, "isatty") and stream.isatty() and "NO_COLOR" not in os.environ
        ch = logging.StreamHandler(stream)
        if console_skip:
            ch.addFilter(_SkipEvents(console_skip))
        ch.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=pre_chain,
                processors=[
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    _drop_console_noise,
                    structlog.dev.ConsoleRenderer(
                        colors=colors, sort_keys=False,
                        exception_formatter=structlog.dev.plain_traceback,
                    ),
                ],
            )
        )
        root.addHandler(ch)
    structlog.configure(
        processors=[*_SHARED, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(source=source, pid=os.getpid())


def get(name: str = "overnight") -> Any:
    return structlog.get_logger(name)
