"""Memory watch: sample the worker (RSS of its process tree, MLX memory from telemetry) and
the system (available memory) with psutil, and decide when a planned restart is due.

The worker's memory is the largest of its RSS, what MLX holds (active + its buffer cache,
from telemetry) and, on macOS, its physical footprint (shared/footprint.py: read here with
proc_pid_rusage, or as the worker sent it): Metal's memory is invisible to RSS and to
`mx.get_peak_memory()`, and a footprint of 51 GB beside a peak of 7 GB is what public reports
show before the machine goes down.

A planned restart (SIGTERM: the worker checkpoints and exits, then is restarted at once) is
not a failure. It happens when
- the worker's memory exceeds `memory_limit_mb` (0 = off), or
- the worker's memory keeps growing — the slow leak that kills long runs: more than
  `memory_growth` (fraction) above its baseline for `memory_growth_samples` samples in a row.
  The baseline is the lowest of the first samples after `memory_warmup_steps` steps, or
- system available memory drops below `min_available_mb` (0 = off).

The worker's children are found by walking the process table (psutil's `children()` reads
every process's /proc/PID/stat on Linux: ~1.8 ms of CPU for 75 processes, 90% of a sample,
0.2% of a core at one sample a second), so the list is found again every CHILDREN_EVERY
seconds (and on the first sample of a process); in between, the children known are read (a
child that has exited, or whose pid is now another process's, is dropped).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import psutil

from shared.config import SupervisorOptions
from shared.footprint import phys_footprint_mb

MB = 1024 * 1024
BASELINE_SAMPLES = 3
CHILDREN_EVERY = 30.0  # seconds between walks of the process table for the worker's children
# (pid, start time) -> (found at, children): a later process with the same pid starts afresh
_children: dict[tuple[int, float], tuple[float, list[psutil.Process]]] = {}


@dataclass(frozen=True)
class Sample:
    time: float
    step: int
    rss_mb: float  # the worker's process tree
    mlx_mb: float  # MLX active memory from telemetry
    available_mb: float  # system
    total_mb: float
    cache_mb: float = 0.0  # MLX's buffer cache from telemetry
    footprint_mb: float = 0.0  # macOS physical footprint (0: not measured)

    @property
    def worker_mb(self) -> float:
        return max(self.rss_mb, self.mlx_mb + self.cache_mb, self.footprint_mb)

    @property
    def available_fraction(self) -> float:
        return self.available_mb / self.total_mb if self.total_mb > 0 else 1.0


def sample(pid: int, now: float, step: int, mlx_mb: float, cache_mb: float = 0.0,
           footprint_mb: float = 0.0) -> Sample | None:
    """RSS of the process and its children plus system memory; None if it is gone. The
    physical footprint is measured here on macOS, else the worker's own (`footprint_mb`)."""
    try:
        proc = psutil.Process(pid)
        rss = proc.memory_info().rss
        for child in _descendants(proc, now):
            with contextlib.suppress(psutil.Error):
                if child.is_running():  # still the process found (pid and start time)
                    rss += child.memory_info().rss
    except psutil.Error:
        return None
    vm = psutil.virtual_memory()
    footprint = phys_footprint_mb(pid) or footprint_mb
    return Sample(now, step, rss / MB, mlx_mb, vm.available / MB, vm.total / MB, cache_mb,
                  footprint)


def _descendants(proc: psutil.Process, now: float) -> list[psutil.Process]:
    """`proc`'s children at any depth, as found at most CHILDREN_EVERY seconds ago (`now`:
    the caller's clock, seconds). psutil.Error when `proc` is gone."""
    key = (proc.pid, proc.create_time())  # psutil.Process has read it already
    found = _children.get(key)
    if found is None or not 0 <= now - found[0] < CHILDREN_EVERY:
        for old in [k for k, (at, _) in _children.items() if not 0 <= now - at < CHILDREN_EVERY]:
            del _children[old]  # ended workers' entries go
        found = _children[key] = (now, proc.children(recursive=True))
    return found[1]


@dataclass
class MemoryWatch:
    """Per attempt: peaks, baseline, and the planned-restart decision."""

    opts: SupervisorOptions
    start_step: int = 0
    last: Sample | None = None
    peak_rss_mb: float = 0.0
    peak_mlx_mb: float = 0.0
    min_available_mb: float | None = None
    baseline: list[float] = field(default_factory=list)
    above: int = 0

    def add(self, s: Sample) -> str | None:
        """Fold in a sample; a reason string when a planned restart is due."""
        self.last = s
        self.peak_rss_mb = max(self.peak_rss_mb, s.rss_mb)
        self.peak_mlx_mb = max(self.peak_mlx_mb, s.mlx_mb)
        if self.min_available_mb is None or s.available_mb < self.min_available_mb:
            self.min_available_mb = s.available_mb
        o = self.opts
        if o.memory_limit_mb > 0 and s.worker_mb > o.memory_limit_mb:
            return (
                f"worker memory {s.worker_mb:.0f} MB above memory_limit_mb "
                f"{o.memory_limit_mb:.0f} (rss {s.rss_mb:.0f} MB, mlx {s.mlx_mb:.0f} MB"
                f"{f', mlx cache {s.cache_mb:.0f} MB' if s.cache_mb else ''}"
                f"{f', physical footprint {s.footprint_mb:.0f} MB' if s.footprint_mb else ''})"
            )
        if o.min_available_mb > 0 and s.available_mb < o.min_available_mb:
            return (
                f"system available memory {s.available_mb:.0f} MB below min_available_mb "
                f"{o.min_available_mb:.0f}"
            )
        return self._growth(s)

    def _growth(self, s: Sample) -> str | None:
        o = self.opts
        if o.memory_growth <= 0 or s.step < self.start_step + o.memory_warmup_steps:
            return None
        if len(self.baseline) < BASELINE_SAMPLES:
            self.baseline.append(s.worker_mb)
            return None
        base = min(self.baseline)
        if base <= 0 or s.worker_mb <= base * (1 + o.memory_growth):
            self.above = 0
            return None
        self.above += 1
        if self.above < o.memory_growth_samples:
            return None
        return (
            f"worker memory grew from {base:.0f} MB to {s.worker_mb:.0f} MB "
            f"(+{s.worker_mb / base - 1:.0%} > memory_growth {o.memory_growth:.0%}) "
            f"over {self.above} samples: likely a leak"
        )
