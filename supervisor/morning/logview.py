"""`overnight logs [RUN_DIR]`: the supervisor's and the worker's JSON logs, merged in time order.

    overnight logs runs/mini                       # everything, aligned, coloured on a terminal
    overnight logs --level warning --since 2h      # what went wrong lately (newest run in ./runs/)
    overnight logs runs/mini --event restart --event exited    # names containing either word
    overnight logs runs/mini --attempt 2 -n 50     # the last 50 lines of the second attempt
    overnight logs runs/mini -f                    # follow a running job (Ctrl-C ends)
    overnight logs runs/mini --json | jq .event    # the JSON lines themselves
    overnight logs runs/mini --json | jq -r .event | sort | uniq -c     # one line per event

Reads logs/supervisor.jsonl and logs/worker.jsonl with their rotated backups (`.5` … `.1`,
oldest first: shared/logsetup.py rotates by size) through supervisor/runlogs.py. A line cut
short by a killed process, or glued to the next writer's line, costs only itself: what is
still a JSON object is shown and a note on stderr counts the rest. Supervisor lines without
an attempt number belong to the attempt the supervisor last spawned, so `--attempt N` also
shows what the supervisor did about N.

One event, one line. The supervisor writes two of the worker's events to its own log as well,
as their telemetry arrives: `checkpoint_saved` and `worker_stopping`, marked
`relayed_from: "worker"` (supervisor/morning/runlogs.py RELAYED_EVENTS) so that
supervisor.jsonl alone tells the night. Merged with the worker's log they would count twice,
so the merged view leaves the relayed copies out; `--source supervisor` shows
supervisor.jsonl as it is (the copies are then the only ones), and `--relayed` shows them
everywhere. What the supervisor decided about an attempt is its own events (`worker_exited`,
`recovery_decision`, `state_changed`), always shown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import math
import os
import re
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

from shared import run_record
from shared.errors import ConfigError
from shared.layout import RunDir
from supervisor.morning.runlogs import (
    SOURCES,
    LogLine,
    Problems,
    Tail,
    first_time,
    is_relayed,
    key,
    last_time,
    merged,
    parse_time,
    resolve_run_dir,
    tails,
)

LEVELS = ("debug", "info", "warning", "error", "critical")
# Keys every line has (shown in the columns, or only noise for a person); a worker's
# attempt is in the source column, a supervisor line's attempt stays a field.
COLUMN_KEYS = frozenset({"timestamp", "level", "event", "source", "pid", "run_id", "logger"})
MAX_VALUE = 160
FOLLOW_INTERVAL = 0.5
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


# ---- filtering -------------------------------------------------------------------------


def parse_since(text: str, now: float) -> float:
    """`90s`, `15m`, `2h`, `1d`, `1w` before now, or an ISO date/time -> epoch seconds."""
    m = _DURATION.match(text)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    t = parse_time(text)
    if math.isnan(t):
        raise ConfigError(f"--since: expected a duration like 30m, 2h, 1d or an ISO time "
                          f"like 2025-01-02T03:00, got {text!r}")
    if not re.search(r"(Z|[+-]\d\d:?\d\d)$", text):  # no zone (or a date alone): local
        t = dt.datetime.fromisoformat(text).astimezone().timestamp()
    return t


@dataclass(frozen=True)
class Filter:
    min_level: int = 0
    since: float = -math.inf
    events: tuple[str, ...] = ()
    attempt: int | None = None
    source: str | None = None
    relayed: bool = False  # show the supervisor's copies of worker events beside the originals

    def event_matches(self, event: str) -> bool:
        if not self.events:
            return True
        for pattern in self.events:
            if any(c in pattern for c in "*?["):
                if fnmatch.fnmatchcase(event, pattern):
                    return True
            elif pattern in event:
                return True
        return False

    def accepts(self, line: LogLine, attempt: int | None) -> bool:
        level = LEVELS.index(line.level) if line.level in LEVELS else 1
        if is_relayed(line) and not self.relayed and self.source != "supervisor":
            return False  # the worker's own line of the event is in the view
        return (level >= self.min_level
                and (math.isnan(line.time) or line.time >= self.since)
                and (self.source is None or line.source == self.source)
                and (self.attempt is None or attempt == self.attempt)
                and self.event_matches(line.event))


class AttemptTracker:
    """The attempt a line belongs to: its own `attempt`, else the last one spawned."""

    def __init__(self) -> None:
        self.current: int | None = None

    def __call__(self, line: LogLine) -> int | None:
        own = line.data.get("attempt")
        if line.source == "supervisor" and line.event == "worker_spawned" and isinstance(own,
                                                                                         int):
            self.current = own
        return own if isinstance(own, int) else self.current


# ---- rendering -------------------------------------------------------------------------


class Style:
    """ANSI colours, or none."""

    LEVEL: ClassVar[dict[str, str]] = {"debug": "2", "info": "32", "warning": "33;1",
                                       "error": "31;1", "critical": "41;1"}
    SOURCE: ClassVar[dict[str, str]] = {"supervisor": "35", "worker": "36"}

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled and code else text


def format_value(value: Any, full: bool = False) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, str):
        text = value if value and not re.search(r"[\s=\"']", value) else json.dumps(value)
    else:
        text = json.dumps(value, separators=(",", ":"), default=str)
    if not full and len(text) > MAX_VALUE:
        text = text[:MAX_VALUE - 1] + "…"
    return text


def local_time(t: float, utc: bool = False) -> str:
    if math.isnan(t):
        return "????-??-?? ??:??:??.???"
    when = dt.datetime.fromtimestamp(t, dt.timezone.utc if utc else None)
    return when.strftime("%Y-%m-%d %H:%M:%S.") + f"{when.microsecond // 1000:03d}"


def render(line: LogLine, style: Style, utc: bool = False, full: bool = False) -> str:
    """`2025-01-02 03:04:05.678  WARNING  worker 2    event_name   key=value ...`"""
    d = line.data
    source = line.source
    hidden = COLUMN_KEYS | {"exception"}
    if source == "worker" and isinstance(d.get("attempt"), int):
        source = f"worker {d['attempt']}"
        hidden |= {"attempt"}
    fields = " ".join(
        f"{style(k, '2')}={format_value(v, full)}" for k, v in d.items() if k not in hidden
    )
    level = line.level.upper()
    text = (f"{local_time(line.time, utc)}  {style(f'{level:<8}', Style.LEVEL.get(line.level, ''))}"
            f" {style(f'{source:<10}', Style.SOURCE.get(line.source, ''))}  "
            f"{style(f'{line.event:<22}', '1')} {fields}").rstrip()
    exc = d.get("exception")
    if exc:
        text += "\n" + _exception_lines(exc)
    return text


def _exception_lines(exc: Any) -> str:
    """structlog's dict_tracebacks: `[{exc_type, exc_value, frames: [...]}, ...]`."""
    if isinstance(exc, str):
        return "\n".join("    " + s for s in exc.strip().splitlines()[-6:])
    out = []
    for e in exc if isinstance(exc, list) else [exc]:
        if not isinstance(e, dict):
            continue
        where = ""
        frames = e.get("frames") or []
        if frames and isinstance(frames[-1], dict):
            f = frames[-1]
            where = f"  (at {f.get('filename')}:{f.get('lineno')} in {f.get('name')})"
        out.append(f"    {e.get('exc_type')}: {e.get('exc_value')}{where}")
    return "\n".join(out)


# ---- the command -----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="?", type=Path,
                        help="run directory (default: the most recently modified under ./runs/)")
    parser.add_argument("--json", action="store_true",
                        help="print the JSON lines themselves (for jq)")
    parser.add_argument("--level", choices=LEVELS, default="debug",
                        help="show this level and above (e.g. warning)")
    parser.add_argument("--since", metavar="WHEN",
                        help="only lines after this: 30m, 2h, 1d or an ISO time (local unless "
                             "it has a zone)")
    parser.add_argument("--event", action="append", default=[], metavar="NAME",
                        help="only events whose name contains NAME (or matches a glob like "
                             "'worker_*'); repeat for several")
    parser.add_argument("--attempt", type=int, metavar="N",
                        help="only worker attempt N and what the supervisor did meanwhile")
    parser.add_argument("--source", choices=SOURCES, help="only one process's lines")
    parser.add_argument("--relayed", action="store_true",
                        help="also show the supervisor's copies of worker events "
                             "(checkpoint_saved, worker_stopping: marked relayed_from)")
    parser.add_argument("-n", "--lines", type=int, metavar="N",
                        help="only the last N matching lines (then follow, with -f)")
    parser.add_argument("-f", "--follow", action="store_true",
                        help="keep printing new lines as they are written (Ctrl-C ends)")
    parser.add_argument("--utc", action="store_true", help="UTC times (default: local time)")
    parser.add_argument("--full", action="store_true",
                        help=f"do not shorten values longer than {MAX_VALUE} characters")
    parser.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colours (auto: on a terminal, unless NO_COLOR is set)")


def main(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args.run_dir, "logs")
    if args.lines is not None and args.lines < 0:
        raise ConfigError(f"--lines: expected a number >= 0, got {args.lines}")
    if args.attempt is not None:
        _check_attempt(run_dir, args.attempt, args.follow)
    filt = Filter(
        min_level=LEVELS.index(args.level),
        since=parse_since(args.since, time.time()) if args.since else -math.inf,
        events=tuple(args.event), attempt=args.attempt, source=args.source,
        relayed=args.relayed,
    )
    out = sys.stdout
    color = args.color == "always" or (
        args.color == "auto" and out.isatty() and "NO_COLOR" not in os.environ)
    style = Style(color and not args.json)

    def emit(line: LogLine) -> None:
        if args.json:
            out.write(json.dumps(line.data, default=str) + "\n")
        else:
            out.write(render(line, style, args.utc, args.full) + "\n")

    problems = Problems()
    ts = tails(RunDir(run_dir), problems)
    track = AttemptTracker()
    shown = 0
    try:
        # --since skips what is older without reading it, and so does -n; not with
        # --attempt, whose tracker must see the supervisor's earlier worker_spawned lines
        selected: Iterable[LogLine]
        if args.lines is not None and args.attempt is None:
            selected = last_lines(ts, filt, args.lines, final=not args.follow)
        else:
            lines = merged(ts, final=not args.follow,
                           since=filt.since if args.attempt is None else -math.inf)
            selected = (ln for ln in lines if filt.accepts(ln, track(ln)))
            if args.lines is not None:
                selected = deque(selected, maxlen=args.lines)
        for line in selected:
            emit(line)
            shown += 1
        out.flush()
        if args.follow:
            _follow(ts, filt, track, emit, out)
    except KeyboardInterrupt:
        pass
    finally:
        for t in ts:
            t.close()
    if not args.follow and shown == 0 and not (run_dir / "logs").is_dir():
        print(f"overnight logs: {run_dir}: no logs yet (logs/ does not exist)", file=sys.stderr)
    problems.report(sys.stderr)
    return 0


def _check_attempt(run_dir: Path, n: int, follow: bool) -> None:
    """ConfigError for an attempt the run's record does not have (with -f, a later one may
    still come)."""
    try:
        record = run_record.load(run_dir / "run.json")
    except Exception:  # an unreadable record: the logs still tell what they hold
        return
    count = len(record.attempts) if record is not None else None
    if n < 1 or (count is not None and n > count and not follow):
        have = (f"has attempts 1 to {count}" if count else "has no attempts yet"
                ) if count is not None else "numbers its attempts from 1"
        raise ConfigError(f"--attempt {n}: {run_dir} {have}")


def last_lines(ts: list[Tail], filt: Filter, n: int, final: bool = True) -> list[LogLine]:
    """The last `n` lines of the logs `filt` accepts (no --attempt), read from the end: the
    lines of the last minute (Tail.initial's `since`: a bisection, not a scan), then of 4
    times as long, ... until n of them are recent enough or the whole log is read — so
    `logs -f -n 20` on a 1M-step night reads its last few hundred lines, not 100 MB."""
    newest = max((last_time(t.path) for t in ts), default=math.inf)
    oldest = min((first_time(t.path) for t in ts), default=-math.inf)
    window = 60.0
    while True:
        since = newest - window
        if not math.isfinite(since) or since <= max(filt.since, oldest):
            since = filt.since  # everything the filter lets through
        shown: deque[LogLine] = deque(maxlen=n)
        recent = 0
        for line in merged(ts, final, since=since):
            if filt.accepts(line, None):
                shown.append(line)
                recent += line.time >= since
        if since == filt.since or recent >= n:
            return list(shown)
        window *= 4


def _follow(ts: list[Tail], filt: Filter, track: AttemptTracker, emit: Any,
            out: TextIO) -> None:
    """Poll the logs; each batch of new lines is put in time order before it is shown."""
    while True:
        time.sleep(FOLLOW_INTERVAL)
        batch = sorted((ln for t in ts for ln in t.new_lines()), key=key)
        for line in batch:
            if filt.accepts(line, track(line)):
                emit(line)
        if batch:
            out.flush()
