"""Configure structlog once per process: JSON lines to a rotating file, people-readable console.

Events are snake_case facts (`worker_spawned`, `checkpoint_saved`) with data as fields.
`run_id`, `pid` and (in the worker) `attempt`/`step` are bound with contextvars so that every
line carries them.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
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
        fh = logging.handlers.RotatingFileHandler(
            json_path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
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
