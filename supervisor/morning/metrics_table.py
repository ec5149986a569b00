"""logs/metrics.jsonl as columns: one numpy array per numeric field, read in bounded pieces.

A 100k-step night writes ~40 MB of metrics.jsonl, a 1M-step one ~400 MB (one line per step,
shared.protocol.StepMetrics). Read as a list of dicts that is ~2.8 KB of Python objects per
step (1M steps: ~3 GB, ~25 s); here a piece at a time:

- the file is read in CHUNK_BYTES pieces and each line parsed with orjson (~3x faster than
  the standard library here: 0.32 s against 0.76-1.2 s per 100k lines); a line orjson
  refuses (a torn line, NaN tokens of an old file, a hostile one) goes to
  `runlogs.parse_line`, which recovers a line whose start was cut off and bounds nesting
  (shared/strictjson.py);
- each of COLUMNS becomes a float64 column of the piece (NaN where a line lacks it or has
  null/a string there), in file order; `step` and `attempt` are int64 with -1 / 0 for "not
  said". When a piece's lines all carry every column as a number (what the worker writes)
  the columns come from one C pass (`operator.itemgetter` + one array); otherwise field by
  field. Strings are not kept, except the last line's `run_id`.

The morning's commands fold the pieces into fixed-size state as they come
(`pieces` -> supervisor/morning/metrics_summary.py: memory flat however long the night);
`read` joins them into a whole-file `MetricsTable` (8 bytes per column per step) for
tools and tests that want every line.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from supervisor.morning.runlogs import parse_line

CHUNK_BYTES = 1 << 20  # ~2.5k lines a piece: their transient dicts stay ~5 MB
INT_COLUMNS = {"step": -1, "attempt": 0}  # name -> the value of a line that does not say
# The fields kept (shared.protocol.StepMetrics); int columns first. A field added to the
# metrics line is added here to reach the report.
COLUMNS = ("step", "attempt", "time", "loss", "grad_norm", "lr", "tokens", "tokens_per_sec",
           "step_seconds", "active_mb", "peak_mb", "rss_mb", "cache_mb", "footprint_mb")

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass
class MetricsTable:
    """Columns of equal length n (lines in file order): `step`, `attempt` int64 (n,); every
    other numeric field float64 (n,), NaN where absent. `unreadable`: lines that were not a
    JSON object. `run_id`: the last line's, or None."""

    columns: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    unreadable: int = 0
    run_id: str | None = None

    def __len__(self) -> int:
        return len(self.columns["step"]) if "step" in self.columns else 0

    def __bool__(self) -> bool:
        return len(self) > 0

    def col(self, name: str) -> FloatArray:
        """The column as float64 (n,): NaN for lines without it (all NaN if no line has it)."""
        c = self.columns.get(name)
        if c is None:
            return np.full(len(self), math.nan)
        if name in INT_COLUMNS:
            out = c.astype(np.float64)
            out[c == INT_COLUMNS[name]] = math.nan
            return out
        return c

    @property
    def steps(self) -> IntArray:
        """int64 (n,): each line's step, -1 where it has none."""
        return self.columns.get("step", np.zeros(0, np.int64))

    @property
    def attempts(self) -> IntArray:
        """int64 (n,): each line's attempt number, 0 where it has none."""
        return self.columns.get("attempt", np.zeros(0, np.int64))

    def take(self, index: npt.NDArray[Any] | slice) -> MetricsTable:
        """The lines at `index` (an int array, a bool mask of length n, or a slice: then the
        columns are views, no copy), in that order."""
        return MetricsTable({k: v[index] for k, v in self.columns.items()}, 0, self.run_id)

    def split_by(self, keys: npt.NDArray[np.int64]) -> dict[int, MetricsTable]:
        """key -> the lines with that key (n,), in file order; views when each key's lines
        are contiguous and in key order (attempts one after another: no copy of a 1M-step
        night's columns)."""
        if not len(keys):
            return {}
        if (np.diff(keys) >= 0).all():
            values, starts = np.unique(keys, return_index=True)
            ends = [*starts[1:], len(keys)]
            return {int(k): self.take(slice(int(a), int(b)))
                    for k, a, b in zip(values, starts, ends, strict=True)}
        return {int(k): self.take(keys == k) for k in np.unique(keys)}

    def effective(self) -> IntArray:
        """int64 (m,): for each step present, ascending, the index of the line that counts —
        the last one written for that step (a step redone after a restart supersedes)."""
        return last_per_step(self.steps)

    def last_time(self) -> float | None:
        """The newest line's `time` (Unix seconds, the largest finite one); None if none."""
        times = self.col("time")
        times = times[np.isfinite(times)]
        return float(times.max()) if len(times) else None


def last_per_step(steps: IntArray) -> IntArray:
    """int64 (m,): for each step >= 0 in `steps` (n,), ascending, the index of its last line
    (a step redone after a restart supersedes the earlier line)."""
    valid = np.flatnonzero(steps >= 0)
    if not len(valid):
        return np.zeros(0, np.int64)
    rev = valid[::-1]
    _, first_in_rev = np.unique(steps[rev], return_index=True)  # sorted by step
    return rev[first_in_rev]


def read(path: Path) -> MetricsTable:
    """logs/metrics.jsonl as a MetricsTable (module docstring); an absent or unreadable file
    gives an empty table, never an error. Holds every line's numbers (~110 bytes a step):
    the morning's commands stream the file instead (`pieces`, metrics_summary.py)."""
    columns = _Columns()
    bad = 0
    run_id: str | None = None
    for piece in pieces(path):
        bad += piece.unreadable
        if piece.n:
            if not columns.n:  # room for the whole file at this piece's line length
                columns.reserve(piece.lines_expected)
            columns.append(piece.columns, piece.n)
        if piece.run_id is not None:
            run_id = piece.run_id
    return MetricsTable(columns.result(), bad, run_id)


@dataclass
class Piece:
    """The lines of one CHUNK_BYTES piece of the file: `columns` as `_columns` makes them
    (a column no line of the piece has may be absent), n lines, how many were not a JSON
    object, the piece's last `run_id`, and how many lines the whole file would hold at this
    piece's line length."""

    columns: dict[str, npt.NDArray[Any]]
    n: int
    unreadable: int
    run_id: str | None
    lines_expected: int = 0
    upto: int = 0  # the file offset this piece's lines end at


def pieces(path: Path, start: int = 0, end: int | None = None) -> Iterator[Piece]:
    """logs/metrics.jsonl in CHUNK_BYTES pieces, cut at line ends, each parsed into columns
    (module docstring): memory is one piece's, whatever the file's size. `start`, `end`:
    the byte range read (a line's start each; end None: to the end of the file, lines
    appended meanwhile included) — metrics_split.py reads two ranges at once. An absent or
    unreadable file yields nothing; a read that fails midway ends the pieces there."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open forever
            return
        f = open(path, "rb")  # noqa: SIM115 - closed below; reading stops at an OSError
        size = os.fstat(f.fileno()).st_size if end is None else end
        size -= start
        if start:
            f.seek(start)
    except OSError:
        return
    with f:
        rest = b""
        at = start  # the offset of the next read
        read = start  # the offset the lines parsed so far end at
        while True:
            # reads end at multiples of CHUNK_BYTES in the file, wherever they start: a
            # range starting at a piece's end is cut into the same pieces as the file
            want = CHUNK_BYTES - at % CHUNK_BYTES
            try:
                block = f.read(want if end is None else min(want, end - at))
            except OSError:
                block = b""
            at += len(block)
            cut = 0
            if not block:
                lines = [rest] if rest.strip() else []
                read += len(rest)
                rest = b""
            else:
                block = rest + block
                cut = block.rfind(b"\n")
                if cut < 0:
                    rest = block
                    continue
                lines, rest = block[:cut].split(b"\n"), block[cut + 1:]
                read += cut + 1
            objs, unread = _parse(lines)
            if objs or unread:
                rid = objs[-1].get("run_id") if objs else None
                yield Piece(_columns(objs) if objs else {}, len(objs), unread,
                            rid if isinstance(rid, str) else None,
                            int(size / max(1, cut + 1) * len(lines) * 1.02) + 16, read)
            if not block:
                break


class _Columns:
    """Columns filled in place, grown by half when full: the file's columns are held once,
    not as pieces and then joined (a 1M-step night: ~110 MB, not twice that)."""

    def __init__(self) -> None:
        self.cols: dict[str, npt.NDArray[Any]] = {}
        self.n = 0
        self.capacity = 0

    def reserve(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        for name, old in self.cols.items():
            grown = _blank(name, capacity)
            grown[:self.n] = old[:self.n]
            self.cols[name] = grown
        self.capacity = capacity

    def append(self, piece: dict[str, npt.NDArray[Any]], k: int) -> None:
        if self.n + k > self.capacity:
            self.reserve(max(self.n + k, self.capacity + self.capacity // 2))
        for name, values in piece.items():
            if name not in self.cols:  # a column first seen now: "not said" before
                self.cols[name] = _blank(name, self.capacity)
            self.cols[name][self.n:self.n + k] = values
        self.n += k

    def result(self) -> dict[str, npt.NDArray[Any]]:
        if not self.n:
            return {name: np.zeros(0, np.int64) for name in INT_COLUMNS}
        for name in INT_COLUMNS:
            self.cols.setdefault(name, _blank(name, self.capacity))
        return {name: c[:self.n] for name, c in self.cols.items()}


def _blank(name: str, n: int) -> npt.NDArray[Any]:
    """A column of n "not said" values: INT_COLUMNS' marker, else NaN."""
    if name in INT_COLUMNS:
        return np.full(n, INT_COLUMNS[name], np.int64)
    return np.full(n, math.nan)


def _parse(lines: list[bytes]) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects among `lines` and how many were not one (blank lines are neither)."""
    try:  # the common case: every line a JSON object orjson takes
        parsed = list(map(orjson.loads, lines))
        if all(type(o) is dict for o in parsed):
            return parsed, 0
    except orjson.JSONDecodeError:
        pass
    objs: list[dict[str, Any]] = []
    bad = 0
    for raw in lines:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:  # also NaN tokens, > 64-bit integers, deep nesting
            if not raw.strip():
                continue
            obj = parse_line(raw.decode("utf-8", "replace"))
        if type(obj) is dict:
            objs.append(obj)
        elif raw.strip():
            bad += 1
    return objs, bad


def _columns(objs: list[dict[str, Any]]) -> dict[str, npt.NDArray[Any]]:
    """COLUMNS of `objs` as arrays: in one C pass (itemgetter, then one float64 array; a null
    becomes NaN) when every line has the first line's columns as numbers, step and attempt
    among them — what the worker writes — else field by field."""
    names = [n for n in COLUMNS if n in objs[0]]
    out: dict[str, npt.NDArray[Any]] = {}
    try:
        # lines of one shape (the worker's): a line with more keys than the first (a newer
        # version's, after a resume) would lose the columns the first lacks
        if names[:2] == ["step", "attempt"] and len(set(map(len, objs))) == 1:
            grid = np.array(list(map(itemgetter(*names), objs)), np.float64)
            ids = grid[:, :2]
            if np.isfinite(ids).all() and (ids == np.floor(ids)).all():
                for j, name in enumerate(names):
                    out[name] = grid[:, j].astype(np.int64) if j < 2 else grid[:, j]
                return out  # a column the first line lacks is left out (NaN) in this piece
    except (KeyError, TypeError, ValueError):
        pass  # a line without a column, or a string in one: the careful way
    nan = math.nan
    for name in COLUMNS:
        values = [o.get(name) for o in objs]
        if name in INT_COLUMNS:
            missing = INT_COLUMNS[name]
            out[name] = np.array([v if type(v) is int else missing for v in values], np.int64)
        else:
            out[name] = np.array([v if type(v) is float or type(v) is int else nan
                                  for v in values], np.float64)
    return out
