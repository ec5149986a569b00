"""A run's JSON logs: finding the run, reading logs that rotate and get cut off, following.

Used by `overnight logs` (supervisor/logview.py), the report (supervisor/runfacts.py) and
the demo. Each log is a .jsonl file written by shared/logsetup.py through a size-rotating
handler: `worker.jsonl.N` … `.1` are older backups. A line cut short by a killed process,
or glued to the next writer's line, costs only itself (`parse_line`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import heapq
import math
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson

from shared import strictjson
from shared.errors import ConfigError
from shared.layout import RunDir, require_run
from shared.tail import tail_lines

SOURCES = ("supervisor", "worker")
# Worker events the supervisor also writes to its own log when their telemetry arrives
# (supervisor/daemon/runner.py), so that supervisor.jsonl alone tells the night. They are
# marked `relayed_from: "worker"` (logs written before that mark: these names, unmarked; the
# supervisor never writes them on its own account). One event, two lines: a merged view shows
# the worker's own line only (`is_relayed`).
RELAYED_EVENTS = frozenset({"checkpoint_saved", "worker_stopping"})

@dataclass(frozen=True)
class LogLine:
    time: float  # seconds since the epoch (nan when the line has no readable timestamp)
    data: dict[str, Any]

    @property
    def source(self) -> str:
        return str(self.data.get("source", "?"))

    @property
    def event(self) -> str:
        return str(self.data.get("event", ""))

    @property
    def level(self) -> str:
        return str(self.data.get("level", "info")).lower()


def is_relayed(line: LogLine) -> bool:
    """A supervisor line that repeats a worker's event (see RELAYED_EVENTS)."""
    return line.source == "supervisor" and (
        line.data.get("relayed_from") == "worker" or line.event in RELAYED_EVENTS)


@dataclass
class Problems:
    """Lines that were not JSON objects: counted, reported once on stderr, never fatal."""

    skipped: list[str] = field(default_factory=list)

    def note(self, where: str) -> None:
        self.skipped.append(where)

    def report(self, out: TextIO) -> None:
        if self.skipped:
            first = ", ".join(self.skipped[:3]) + (" …" if len(self.skipped) > 3 else "")
            print(f"overnight logs: skipped {len(self.skipped)} unreadable line(s) "
                  f"(a process killed mid-write): {first}", file=out)


_MINUTES: dict[str, float] = {}  # "2026-11-30T11:29" -> its epoch (UTC): a night has ~1000


def parse_time(value: Any) -> float:
    """ISO 8601 (structlog's `...Z` or run.json's `+00:00`) -> epoch seconds; nan if not.

    structlog's UTC form ("2026-11-30T11:29:08.047981Z") takes a fast path: the minute's
    epoch, parsed once and cached, plus the seconds (a 1M-step night's logs hold ~100k
    timestamps)."""
    if not isinstance(value, str) or not value:
        return math.nan
    if len(value) > 17 and value[-1] == "Z" and value[16] == ":" and value[10] == "T":
        minute = value[:16]
        base = _MINUTES.get(minute)
        if base is None:
            with contextlib.suppress(ValueError):
                base = _MINUTES[minute] = dt.datetime.fromisoformat(
                    minute + ":00+00:00").timestamp()
        if base is not None:
            with contextlib.suppress(ValueError):
                seconds = float(value[17:-1])
                if 0.0 <= seconds < 60.0:
                    return base + seconds
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return math.nan
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return t.timestamp()


def parse_line(text: str) -> dict[str, Any] | None:
    """One JSON object, or the last whole object in a line whose start was cut off.

    A writer killed mid-line leaves `{"step": 4, "ev` without a newline; the next process
    appends its own line to it. The tail is still a good line, so it is recovered.
    """
    text = text.strip()
    if not text:
        return None
    with contextlib.suppress(orjson.JSONDecodeError):  # the fast path (~3x): most lines
        obj = orjson.loads(text)
        return obj if isinstance(obj, dict) else None
    with contextlib.suppress(ValueError):  # NaN tokens of an old file; bounded nesting
        obj = strictjson.loads(text)
        return obj if isinstance(obj, dict) else None
    start = text.find('{"', 1)
    while start != -1:
        with contextlib.suppress(ValueError):
            obj = strictjson.loads(text[start:])
            if isinstance(obj, dict):
                return obj
        start = text.find('{"', start + 1)
    return None


def rotated_files(path: Path) -> list[Path]:
    """`path` and its RotatingFileHandler backups, oldest first: .N … .2, .1, path."""
    backups = []
    for p in path.parent.glob(path.name + ".*"):
        suffix = p.name[len(path.name) + 1:]
        if suffix.isdigit():
            backups.append((int(suffix), p))
    return [p for _, p in sorted(backups, reverse=True)] + ([path] if path.exists() else [])


SINCE_SLACK_S = 300.0
DRAIN_BYTES = 256 << 10  # a live log is read this much at a time
BISECT_STOP_BYTES = 64 << 10


def _time_at(f: Any, offset: int) -> tuple[float, int]:
    """(time, start offset) of the first whole line starting after `offset` that has a
    time; (inf, end) when none does within 64 KiB."""
    f.seek(offset)
    if offset:
        f.readline()  # the rest of a line cut by the seek
    start = f.tell()
    for _ in range(64):
        raw = f.readline(BISECT_STOP_BYTES)
        if not raw:
            break
        obj = parse_line(raw.decode("utf-8", "replace"))
        t = parse_time(obj.get("timestamp")) if obj else math.nan
        if not math.isnan(t):
            return t, start
        start = f.tell()
    return math.inf, f.tell()


def _offset_at(f: Any, since: float) -> int:
    """A line boundary in the open file `f` before which every line is older than `since`
    (0 when unsure): bisection over byte offsets, the lines being in time order."""
    try:
        lo, hi = 0, os.fstat(f.fileno()).st_size
        while hi - lo > BISECT_STOP_BYTES:
            mid = (lo + hi) // 2
            t, start = _time_at(f, mid)
            if t < since:
                lo = start
            else:
                hi = mid
        _, start = _time_at(f, lo) if lo else (0.0, 0)
        return start
    except (OSError, ValueError):
        return 0


def first_time(path: Path) -> float:
    """The time of the first timed line (in its first 64 lines) of a log and its rotated
    backups; inf when unknown."""
    times = []
    for p in rotated_files(path):
        with contextlib.suppress(OSError, ValueError), open(p, "rb") as f:
            times.append(_time_at(f, 0)[0])
    return min(times, default=math.inf)


def last_time(path: Path) -> float:
    """The time of the last timed line (in its last 64 KiB) of a log; inf when unknown."""
    for raw in reversed(tail_lines(path, 65536)):
        obj = parse_line(raw.decode("utf-8", "replace"))
        t = parse_time(obj.get("timestamp")) if obj else math.nan
        if not math.isnan(t):
            return t
    return math.inf


def _to_line(obj: dict[str, Any], default_source: str) -> LogLine:
    obj.setdefault("source", default_source)
    return LogLine(parse_time(obj.get("timestamp")), obj)


class Tail:
    """One logical log (a .jsonl file and its backups), read to the end and then followed.

    Survives rotation (the file is replaced: finish the old one, open the new one) and
    truncation (start again from the top).
    """

    def __init__(self, path: Path, source: str, problems: Problems) -> None:
        self.path = path
        self.source = source
        self.problems = problems
        self.handle: Any = None
        self.inode: int | None = None
        self.partial = b""
        self.lineno: int | None = 0

    def initial(self, final: bool = True, since: float = -math.inf) -> Iterator[LogLine]:
        """Every line so far: the backups, then the live file (left open for `follow`;
        then a last line still being written waits for its newline). `since` (epoch
        seconds): lines older than it may be left out — a backup whose last line is older,
        and the part of the live file before it (found by bisection on the timestamps of
        the lines; SINCE_SLACK_S of slack for lines written out of order)."""
        for backup in rotated_files(self.path):
            if backup != self.path and last_time(backup) >= since - SINCE_SLACK_S:
                yield from self._whole_file(backup)
        self._open()
        if self.handle is not None and since > -math.inf:
            offset = _offset_at(self.handle, since - SINCE_SLACK_S)
            self.handle.seek(offset)
            if offset:
                self.lineno = None  # unknown after a seek: a note names the file alone
        yield from self.new_lines(final=final)

    def _whole_file(self, path: Path) -> Iterator[LogLine]:
        try:
            with open(path, "rb") as f:
                for n, raw in enumerate(f, 1):
                    line = self._decode(raw, f"{path.name}:{n}")
                    if line is not None:
                        yield line
        except OSError:
            return

    def _open(self) -> None:
        if self.handle is not None:
            self.handle.close()
        self.handle, self.inode, self.partial, self.lineno = None, None, b"", 0
        try:
            self.handle = open(self.path, "rb")  # noqa: SIM115 - kept open to follow
            self.inode = os.fstat(self.handle.fileno()).st_ino
        except OSError:
            self.handle = None

    def new_lines(self, final: bool = False) -> Iterator[LogLine]:
        """Complete lines written since the last call. `final`: also a last line without a
        newline (reading once); otherwise it waits for its newline (following)."""
        if self.handle is None:
            self._open()
            if self.handle is None:
                return
        yield from self._drain(final)
        try:
            st = os.stat(self.path)
        except OSError:
            return
        # Rotated (a new file: the rest of the old one was read above) or truncated in place.
        if st.st_ino != self.inode or st.st_size < self.handle.tell():
            self._open()
            yield from self._drain(final)

    def _drain(self, final: bool) -> Iterator[LogLine]:
        """The lines up to the end of the file, read DRAIN_BYTES at a time (a 1M-step
        night's worker log is ~100 MB: its lines are never all in memory at once)."""
        while True:
            block = self.handle.read(DRAIN_BYTES)
            lines = (self.partial + block).split(b"\n") if block else []
            if lines:
                self.partial = lines.pop()
            elif final and self.partial:
                lines, self.partial = [self.partial], b""
            for raw in lines:
                if self.lineno is not None:
                    self.lineno += 1
                line = self._decode(raw, self.path.name if self.lineno is None
                                    else f"{self.path.name}:{self.lineno}")
                if line is not None:
                    yield line
            if not block:
                return

    def _decode(self, raw: bytes, where: str) -> LogLine | None:
        with contextlib.suppress(orjson.JSONDecodeError):  # the common case, without decoding
            fast = orjson.loads(raw)
            if type(fast) is dict:
                return _to_line(fast, self.source)
        text = raw.decode("utf-8", "replace")
        if not text.strip():
            return None
        obj = parse_line(text)
        if obj is None:
            self.problems.note(where)
            return None
        return _to_line(obj, self.source)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def tails(run: RunDir, problems: Problems, sources: Iterable[str] = SOURCES) -> list[Tail]:
    paths = {"supervisor": run.supervisor_log, "worker": run.worker_log}
    return [Tail(paths[s], s, problems) for s in sources]


def key(line: LogLine) -> float:
    """Sort key: the time (lines without one first)."""
    return line.time if not math.isnan(line.time) else -math.inf


def merged(ts: list[Tail], final: bool = True, since: float = -math.inf) -> Iterator[LogLine]:
    """All lines so far of several logs in time order (each log is already in order);
    `since`: lines older than it may be left out (Tail.initial)."""
    return heapq.merge(*(t.initial(final, since) for t in ts), key=key)


def read_run_logs(run_dir: Path, sources: Iterable[str] = SOURCES,
                  problems: Problems | None = None) -> Iterator[LogLine]:
    """Every line of a run's logs in time order (for the report)."""
    ts = tails(RunDir(run_dir), problems or Problems(), sources)
    try:
        yield from merged(ts)
    finally:
        for t in ts:
            t.close()


def tail_jsonl(path: Path, max_bytes: int = 512_000) -> list[dict[str, Any]]:
    """The JSON objects in the last `max_bytes` of a .jsonl file (shared/tail.py): cheap
    enough for `overnight status` on a week-long run."""
    out = []
    for raw in tail_lines(path, max_bytes):
        obj = parse_line(raw.decode("utf-8", "replace"))
        if obj is not None:
            out.append(obj)
    return out


# ---- choosing the run ------------------------------------------------------------------


def _last_modified(path: Path) -> float:
    times = [path.stat().st_mtime]
    for p in (path / "run.json", path / "logs" / "worker.jsonl", path / "logs" /
              "supervisor.jsonl", path / "logs" / "metrics.jsonl"):
        with contextlib.suppress(OSError):
            times.append(p.stat().st_mtime)
    return max(times)


def resolve_run_dir(given: Path | None, command: str, err: TextIO | None = None) -> Path:
    """The run directory to show: the one given, or the newest under ./runs/ (said on stderr).

    ConfigError (one line, exit 78) when it is missing or is not a run directory.
    """
    if given is not None:
        require_run(given)
        return given.resolve()
    runs = Path("runs")
    found = [p for p in runs.iterdir() if p.is_dir() and RunDir(p).looks_like_run] \
        if runs.is_dir() else []
    if not found:
        raise ConfigError("no RUN_DIR given and no run directory under ./runs/")
    newest = max(found, key=_last_modified)
    print(f"overnight {command}: {newest} (the most recently modified run under ./runs/)",
          file=err or sys.stderr)
    return newest.resolve()
