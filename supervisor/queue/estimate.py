"""How long a job will take, from speed measured tonight: the queue's ETAs and the deadline's
"cannot finish in time" test.

A measurement (`Speed`) comes from a run directory's facts (supervisor/morning/runfacts.py,
the same facts the report reads): seconds per step over the last attempt's metrics lines —
the time between its first and last step divided by the steps between, so evaluations and
checkpoint saves inside that span are counted, a restart's downtime is not — and the
start-up, from the attempt's start to its first step (loading, compiling). A job that has
run before (resumed after a deadline or a crash) is measured on itself; a job that has not
is estimated from the newest measured job in the queue, scaled by the effective batch
(`batch_size` × `grad_accumulation_steps`: a step's work grows with it). With no measurement
at all there is no estimate, and a job is never skipped for want of one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.morning.facts import RunFacts, whole

MIN_STEPS = 2  # steps between first and last metrics line for a measurement


@dataclass(frozen=True)
class Speed:
    """seconds per step, start-up seconds, the effective batch it was measured at, and where
    (a job's name)."""

    step_seconds: float
    startup_seconds: float
    batch: int
    source: str

    def for_batch(self, batch: int) -> Speed:
        scale = batch / self.batch if self.batch > 0 and batch > 0 else 1.0
        return Speed(self.step_seconds * scale, self.startup_seconds, batch, self.source)

    def seconds_for(self, steps: int) -> float:
        return self.startup_seconds + max(0, steps) * self.step_seconds


def effective_batch(config: dict[str, Any]) -> int:
    return max(1, whole(config.get("batch_size"), 1)) * max(
        1, whole(config.get("grad_accumulation_steps"), 1))


def measure(facts: RunFacts, source: str) -> Speed | None:
    """The speed measured in a run (module docstring), or None with too few steps."""
    by_attempt = facts.metrics_by_attempt()
    for attempt in reversed(facts.attempts):
        lines = by_attempt.get(attempt.number)
        if lines is None:
            continue
        if lines.timed < 2 or lines.first is None or lines.last is None:
            continue  # its first and last lines with a time and a step (metrics_summary)
        (t0, s0), (t1, s1) = lines.first, lines.last
        steps = s1 - s0
        if steps < MIN_STEPS:
            continue
        span = t1 - t0
        startup = t0 - attempt.started if not math.isnan(attempt.started) else 0.0
        return Speed(span / steps, max(0.0, startup), effective_batch(facts.config), source)
    return None


def remaining_steps(facts: RunFacts | None, config: dict[str, Any]) -> int:
    total = whole(config.get("iters"), 0)
    if facts is None:
        return total
    return max(0, (facts.total_steps or total) - facts.final_step)


def estimate(own: Speed | None, latest: Speed | None, config: dict[str, Any],
             steps: int) -> tuple[float, Speed] | None:
    """(seconds to do `steps`, the speed used): the job's own measurement, else the newest
    one scaled to its batch; None without either."""
    speed = own or (latest.for_batch(effective_batch(config)) if latest else None)
    if speed is None:
        return None
    return speed.seconds_for(steps), speed


def speed_of(run_dir: Path, name: str) -> Speed | None:
    """The speed measured in `run_dir` (None: nothing ran there, or too few steps)."""
    from shared.errors import OvernightError
    from supervisor.morning.runfacts import gather

    if not (run_dir / "logs" / "metrics.jsonl").exists():
        return None
    try:
        return measure(gather(run_dir), name)
    except (OvernightError, OSError, ValueError):
        return None
