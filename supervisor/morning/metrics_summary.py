"""logs/metrics.jsonl summed up as it streams by: what the morning's commands need of it, in
memory that does not grow with the night.

The file is read a piece at a time (metrics_table.pieces: CHUNK_BYTES, columns per piece)
and each piece folded into fixed-size state, then dropped:

- the whole file: lines, unreadable lines, the last run_id, the highest step, the first and
  newest times, and the time of the last line of each evaluated step (the comparison's
  picture);
- per attempt (`Group`: by the `attempt` field under a supervisor, by start time without
  one; facts.RunFacts.metrics_by_attempt): lines, sums of step_seconds and tokens, the
  highest peak_mb and rss_mb, the first and last five active_mb values (memory growth), the
  step_seconds of the steps a restart redid (`Plan.redo_after`), the first and last line
  with a time and a step (the queue's speed), the steps over time in `Buckets`;
- per worker process of a run without run.json (`Window`: the lines between its start and
  the next one's; runfacts.attempts_from_logs);
- per throttled stretch (machine.py): the median step_seconds inside and outside it
  (`Median`: exact up to EXACT_MEDIAN values, then a log-spaced histogram: +-0.2 %);
- the series the picture draws (`StepSeries`: loss and memory by step).

Sums are added piece by piece (a file of one piece: exactly the sum of the whole column, as
numpy computes it); extremes, counts and last values are exact at any size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from supervisor.morning import metrics_table
from supervisor.morning.buckets import Buckets
from supervisor.morning.metrics_table import last_per_step

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
MAX_POINTS = 4000  # buckets per drawn series (report_plot.MAX_POINTS)
EXACT_MEDIAN = 1 << 16  # values a median keeps exactly before it becomes a histogram
# The picture's series by step: loss, then memory (report_plot._memory_panel); the ones
# marked True count only positive values (0: not measured on this machine).
SERIES = (("loss", False), ("active_mb", False), ("peak_mb", False), ("rss_mb", False),
          ("cache_mb", True), ("footprint_mb", True))
# Median histogram: log10(seconds) from 1e-7 to 1e5 s in 1000 bins a decade.
_LOG_LOW, _LOG_HIGH, _PER_DECADE = -7.0, 5.0, 1000


@dataclass(frozen=True)
class Plan:
    """What is known before the metrics are read. `starts`: None under a supervisor (lines
    are grouped by their attempt field), else the worker processes' start times, ascending
    (a line belongs to the last one started at or before its time; before all: the first).
    `windows`: the processes' start times in log order (runs without run.json).
    `redo_after`: attempt -> the step the next attempt resumed from (its later steps were
    redone). `periods`: throttled stretches (start, end; end None: to the end). `evals`: the
    evaluated steps."""

    starts: FloatArray | None = None
    windows: tuple[float, ...] = ()
    redo_after: dict[int, int] = field(default_factory=dict)
    periods: tuple[tuple[float, float | None], ...] = ()
    evals: frozenset[int] = frozenset()


class Median:
    """The median of values added piece by piece: exact for up to EXACT_MEDIAN values, then
    from a histogram of log10(value) in bins 0.23 % wide (values outside 1e-7..1e5 count
    at the ends)."""

    def __init__(self) -> None:
        self.exact: list[FloatArray] = []
        self.n = 0
        self.hist: IntArray | None = None

    def add(self, values: FloatArray) -> None:
        if not len(values):
            return
        self.n += len(values)
        if self.hist is None:
            self.exact.append(values.copy())
            if self.n <= EXACT_MEDIAN:
                return
            values = np.concatenate(self.exact)
            self.exact = []
            self.hist = np.zeros(int((_LOG_HIGH - _LOG_LOW) * _PER_DECADE), np.int64)
        bins = ((np.log10(values) - _LOG_LOW) * _PER_DECADE).astype(np.int64)
        self.hist += np.bincount(np.clip(bins, 0, len(self.hist) - 1), minlength=len(self.hist))

    def value(self) -> float | None:
        if not self.n:
            return None
        if self.hist is None:
            return float(np.median(np.concatenate(self.exact)))
        cum = np.cumsum(self.hist)
        mid = int(np.searchsorted(cum, (self.n + 1) / 2))
        return float(10 ** (_LOG_LOW + (mid + 0.5) / _PER_DECADE))


class StepSeries:
    """SERIES by step, as drawn: each step's last line written (a step redone after a
    restart counts as redone). While at most MAX_POINTS lines came, every line is kept in
    file order (`raw`: the picture draws each step and the superseded lines exactly); past
    that, the steps that count go into `Buckets` and a line whose step is not above every
    step before it also drops the steps from it on (the path the restart abandoned)."""

    def __init__(self) -> None:
        self._steps: list[IntArray] = []
        self._values: list[FloatArray] = []
        self.n = 0
        self.buckets: Buckets | None = None

    @property
    def exact(self) -> bool:
        return self.buckets is None

    def add(self, steps: IntArray, values: FloatArray) -> None:
        keep = steps >= 0
        steps, values = steps[keep], values[keep]
        if not len(steps):
            return
        self.n += len(steps)
        if self.buckets is None:
            self._steps.append(steps)
            self._values.append(values)
            if self.n <= MAX_POINTS:
                return
            steps, values = self.raw()
            eff = last_per_step(steps)
            self._steps, self._values = [], []
            self.buckets = Buckets(len(SERIES), MAX_POINTS)
            self.buckets.add(steps[eff].astype(np.float64), values[eff])
            return
        # line i stays only if every later line's step is above it (a later one at or
        # below it supersedes it); what came before is dropped from the lowest step on
        later_min = np.minimum.accumulate(steps[::-1])[::-1]
        stays = steps < np.append(later_min[1:], np.iinfo(np.int64).max)
        self.buckets.truncate(float(later_min[0]))
        self.buckets.add(steps[stays].astype(np.float64), values[stays])

    def raw(self) -> tuple[IntArray, FloatArray]:
        """Every line with a step, in file order: steps (n,), values (n, len(SERIES))."""
        if not self._steps:
            return np.zeros(0, np.int64), np.zeros((0, len(SERIES)))
        return np.concatenate(self._steps), np.concatenate(self._values)


@dataclass
class Group:
    """One attempt's lines (module docstring); sums and maxima as the report reads them:
    NaN counts 0."""

    n: int = 0
    seconds: float = 0.0  # sum of step_seconds
    tokens: float = 0.0
    peak_mb: float = 0.0
    rss_mb: float = 0.0
    redo_seconds: float = 0.0  # step_seconds of lines above Plan.redo_after
    active_head: list[float] = field(default_factory=list)  # first 5 finite active_mb
    active_tail: list[float] = field(default_factory=list)  # last 5
    timed: int = 0  # lines with a finite time and a step
    first: tuple[float, int] | None = None  # (time, step) of the first such line
    last: tuple[float, int] | None = None
    progress: Buckets = field(default_factory=lambda: Buckets(2, MAX_POINTS))  # (time, step)

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0


@dataclass
class Window:
    """A worker process's lines in a run without run.json (runfacts.attempts_from_logs):
    NaN and infinities count 0 in the sums and maxima."""

    n: int = 0
    max_step: int = -1
    seconds: float = 0.0
    tokens: float = 0.0
    max_time: float = -math.inf
    peak_mb: float = -math.inf
    rss_mb: float = -math.inf


@dataclass
class MetricsSummary:
    """logs/metrics.jsonl summed up (module docstring). Empty: no line was read."""

    n: int = 0
    unreadable: int = 0
    run_id: str | None = None
    max_step: int = -1  # -1: no line has a step
    first_time: float | None = None  # the smallest finite time (Unix seconds)
    newest_time: float | None = None  # the largest
    groups: dict[int, Group] = field(default_factory=dict)
    windows: list[Window] = field(default_factory=list)
    # throttled stretch (start, end) -> the medians of step_seconds inside it and outside
    slow: dict[tuple[float, float | None], tuple[Median, Median]] = field(default_factory=dict)
    series: StepSeries = field(default_factory=StepSeries)
    eval_times: dict[int, float] = field(default_factory=dict)  # step -> its last line's time

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0

    def last_time(self) -> float | None:
        """The newest line's time (the largest finite one); None if none."""
        return self.newest_time


def summarize(path: Path, plan: Plan,
              source: Iterable[metrics_table.Piece] | None = None) -> MetricsSummary:
    """logs/metrics.jsonl at `path` summed up for `plan` (an absent file: empty). `source`:
    its pieces in file order if read otherwise (metrics_split.Split.pieces: on two cores)."""
    out = MetricsSummary(windows=[Window() for _ in plan.windows],
                         slow={p: (Median(), Median()) for p in plan.periods})
    for piece in metrics_table.pieces(path) if source is None else source:
        out.unreadable += piece.unreadable
        if piece.run_id is not None:
            out.run_id = piece.run_id
        if piece.n:
            _fold(out, plan, piece.columns, piece.n)
    return out


def _col(cols: dict[str, npt.NDArray[Any]], name: str, n: int) -> FloatArray:
    c = cols.get(name)
    return np.full(n, math.nan) if c is None else c.astype(np.float64, copy=False)


def _fold(out: MetricsSummary, plan: Plan, cols: dict[str, npt.NDArray[Any]], n: int) -> None:
    steps = cols.get("step", np.full(n, -1, np.int64))
    attempts = cols.get("attempt", np.zeros(n, np.int64))
    times = _col(cols, "time", n)
    secs, toks = _col(cols, "step_seconds", n), _col(cols, "tokens", n)
    out.n += n
    out.max_step = max(out.max_step, int(steps.max()))
    finite_t = times[np.isfinite(times)]
    if len(finite_t):
        lo, hi = float(finite_t.min()), float(finite_t.max())
        out.first_time = lo if out.first_time is None else min(out.first_time, lo)
        out.newest_time = hi if out.newest_time is None else max(out.newest_time, hi)
    for step in plan.evals.intersection(np.unique(steps).tolist()):
        out.eval_times[step] = float(times[np.flatnonzero(steps == step)[-1]])
    values = np.stack([_col(cols, key, n) for key, _ in SERIES], axis=1)
    for j, (_, positive) in enumerate(SERIES):
        if positive:
            values[values[:, j] <= 0, j] = math.nan
    out.series.add(steps, values)
    zeroed = np.nan_to_num(times, nan=0.0)
    if plan.starts is None:
        keys = attempts
    else:
        keys = np.maximum(1, np.searchsorted(plan.starts, zeroed, side="right"))
    for key in np.unique(keys).tolist():
        _fold_group(out.groups.setdefault(int(key), Group()), plan.redo_after.get(int(key)),
                    cols, keys == key, steps, times, secs, toks)
    _fold_windows(out, plan, zeroed, steps, secs, toks, times, cols)
    for (start, end), (inside, outside) in out.slow.items():
        ok = np.isfinite(times) & np.isfinite(secs) & (secs > 0)
        within = (times >= start) & (times <= (math.inf if end is None else end))
        inside.add(secs[ok & within])
        outside.add(secs[ok & ~within])


def _fold_group(g: Group, redo_after: int | None, cols: dict[str, npt.NDArray[Any]],
                mine: npt.NDArray[np.bool_], steps: IntArray, times: FloatArray,
                secs: FloatArray, toks: FloatArray) -> None:
    n = int(mine.sum())
    s, t = steps[mine], times[mine]
    sec = np.nan_to_num(secs[mine], nan=0.0)
    g.n += n
    g.seconds += float(sec.sum())
    g.tokens += float(np.nan_to_num(toks[mine], nan=0.0).sum())
    for name in ("peak_mb", "rss_mb"):
        high = float(np.nan_to_num(_col(cols, name, len(mine))[mine], nan=0.0).max(initial=0.0))
        setattr(g, name, max(getattr(g, name), high))
    if redo_after is not None:
        g.redo_seconds += float(sec[s > redo_after].sum())
    active = _col(cols, "active_mb", len(mine))[mine]
    active = active[np.isfinite(active)]
    if len(g.active_head) < 5:
        g.active_head += active[:5 - len(g.active_head)].tolist()
    g.active_tail = (g.active_tail + active[-5:].tolist())[-5:]
    timed = np.isfinite(t) & (s >= 0)
    if timed.any():
        t, s = t[timed], s[timed]
        if g.first is None:
            g.first = (float(t[0]), int(s[0]))
        g.last = (float(t[-1]), int(s[-1]))
        g.timed += len(t)
        g.progress.add(t, np.stack([t, s.astype(np.float64)], axis=1))


def _fold_windows(out: MetricsSummary, plan: Plan, zeroed: FloatArray, steps: IntArray,
                  secs: FloatArray, toks: FloatArray, times: FloatArray,
                  cols: dict[str, npt.NDArray[Any]]) -> None:
    def clean(x: FloatArray) -> FloatArray:
        return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)

    for i, w in enumerate(out.windows):
        until = plan.windows[i + 1] if i + 1 < len(plan.windows) else math.inf
        mine = (zeroed >= plan.windows[i]) & (zeroed < until)
        if not mine.any():
            continue
        w.n += int(mine.sum())
        w.max_step = max(w.max_step, int(steps[mine].max()))
        w.seconds += float(clean(secs[mine]).sum())
        w.tokens += float(clean(toks[mine]).sum())
        w.max_time = max(w.max_time, float(clean(times[mine]).max()))
        w.peak_mb = max(w.peak_mb, float(clean(_col(cols, "peak_mb", len(mine))[mine]).max()))
        w.rss_mb = max(w.rss_mb, float(clean(_col(cols, "rss_mb", len(mine))[mine]).max()))
