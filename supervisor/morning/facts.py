"""What a reader knows about a run: the facts the verdict, the report and the picture use.

`RunFacts` holds everything gathered from a run directory (supervisor/morning/runfacts.py
gathers them), `Attempt` one worker process. How an attempt ended is a shared FailureClass,
or `Unclassified` when there is none (still running, killed without a word, abandoned, not
known); a run without run.json has the `Unsupervised` states besides the supervisor's.

Three kinds of ending, one definition each, for every view (verdict, report, picture, status):
- a *failure* (`Attempt.failed`): a FailureClass that is not a normal end
  (shared.exitcodes.NORMAL_ENDS), or a worker killed without a word — what run.json counts
  in `totals.failures`;
- a *planned end* (`Attempt.planned`, PLANNED_ENDS): a normal end that does not finish the
  run — a stop on request, a planned restart for memory, and any planned end added to
  NORMAL_ENDS later (a deadline): its own report section, never "time lost to failures";
- the end of the run (completed, early-stopped).
An attempt a dead supervisor left behind (`Unclassified.ABANDONED`) is neither a failure nor
planned, as in run.json.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from shared.exitcodes import NORMAL_ENDS, FailureClass
from shared.faults import ended_by
from shared.layout import RunDir
from shared.run_record import Action, Detection, Quarantined, RunRecord, State
from supervisor.morning.metrics_summary import Group, MetricsSummary


class Unclassified(str, Enum):
    """How an attempt ended when there is no FailureClass for it."""

    RUNNING = "running"  # it has not ended
    KILLED = "killed"  # (no run.json) its log ends without a stop message
    ABANDONED = "abandoned"  # its supervisor died; the next one stopped it and went on
    UNKNOWN = "unknown"  # ended, but nothing says how


Outcome = FailureClass | Unclassified


class Unsupervised(str, Enum):
    """The states of a run without run.json that are not a supervisor's `State`."""

    RUNNING = "running"
    INCOMPLETE = "incomplete"  # the last worker ended before the last step


RunState = State | Unsupervised
# Normal ends that do not finish the run: the attempt was ended on purpose, and not for a fault.
PLANNED_ENDS = frozenset(c for c in NORMAL_ENDS if not c.ends_run)


@dataclass(frozen=True)
class Attempt:
    """One worker process, from the record (supervised) or from the worker log (alone)."""

    number: int
    pid: int | None = None
    started: float = math.nan  # epoch seconds
    ended: float | None = None  # None: still running (or unknown)
    start_step: int = 0
    end_step: int = 0
    resumed_from: int | None = None  # checkpoint step; None: a fresh start
    outcome: Outcome = Unclassified.UNKNOWN
    detail: str = ""
    detected_by: Detection | None = None
    detection_latency_s: float | None = None
    action: Action | None = None  # the supervisor's decision (None without a supervisor)
    action_reason: str = ""
    restart_delay_s: float | None = None
    downtime_s: float | None = None  # previous end noticed -> this attempt's first step
    settings: dict[str, Any] = field(default_factory=dict)
    settings_changed: dict[str, Any] = field(default_factory=dict)
    lr_scale: float | None = None
    skip_steps: int = 0
    tokens_per_sec: float | None = None
    peak_mlx_mb: float | None = None
    peak_rss_mb: float | None = None
    stderr_tail: str = ""
    log: str | None = None  # the raw output file, relative to the run directory
    bad_data: str = ""  # file lines of the failing step's batch (non-finite, spike)
    injected: tuple[str, ...] = ()  # faults fired in it on purpose ("crash@40"; debug.inject)

    @property
    def seconds(self) -> float | None:
        if self.ended is None or math.isnan(self.started):
            return None
        return max(0.0, self.ended - self.started)

    @property
    def failed(self) -> bool:
        """It ended, and not normally (shared.exitcodes.NORMAL_ENDS), as run.json counts
        failures; a worker that died without a word (no run.json) failed too."""
        if isinstance(self.outcome, FailureClass):
            return self.outcome.is_failure
        return self.outcome is Unclassified.KILLED

    @property
    def planned(self) -> bool:
        """It was ended on purpose without finishing the run (PLANNED_ENDS)."""
        return self.outcome in PLANNED_ENDS

    @property
    def injected_by(self) -> str:
        """The injected fault ("crash@40") that explains how it ended, or "" (a real one)."""
        return ended_by(self.injected, self.outcome)


@dataclass(frozen=True)
class RunFacts:
    run_dir: Path
    run_id: str
    supervised: bool  # there is a run.json
    state: RunState  # the record's; without one: finished, early_stopped, running, incomplete
    reason: str
    total_steps: int
    final_step: int
    started: float
    ended: float | None  # None: still running
    attempts: list[Attempt]
    config: dict[str, Any]
    record: RunRecord | None = None
    metrics: MetricsSummary = field(default_factory=MetricsSummary)  # logs/metrics.jsonl
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, val_loss) by step
    best: tuple[int, float] | None = None  # (step, val_loss)
    # the progress events the ETA table reads (time, step, eta_h; eta_marks.py)
    progress: list[dict[str, Any]] = field(default_factory=list)
    data_skipped: dict[str, int] = field(default_factory=dict)  # data file -> malformed lines
    data_files: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> DATA_EVENTS
    checkpoints: list[int] = field(default_factory=list)  # steps present, ascending
    quarantined: tuple[Quarantined, ...] = ()
    complete: dict[str, Any] | None = None
    unreadable_lines: int = 0
    eval_events: int = 0  # `evaluated` events read (a step evaluated again counts again)

    @property
    def finished(self) -> bool:
        return isinstance(self.state, State) and self.state.is_complete

    @property
    def running(self) -> bool:
        if isinstance(self.state, State):
            return not self.state.is_final
        return self.state is Unsupervised.RUNNING

    @property
    def wall_seconds(self) -> float | None:
        end = self.ended if self.ended is not None else time.time()
        return None if math.isnan(self.started) else max(0.0, end - self.started)

    @property
    def test(self) -> tuple[float, int] | None:
        """(test loss, examples) of mlx_lm's test pass (`test: true`), from COMPLETE."""
        loss = num((self.complete or {}).get("test_loss"))
        if loss is None:
            return None
        return loss, whole((self.complete or {}).get("test_examples"))

    @property
    def failures(self) -> list[Attempt]:
        """The attempts that failed (run.json's totals.failures)."""
        return [a for a in self.attempts if a.failed]

    @property
    def planned_ends(self) -> list[Attempt]:
        """The attempts ended on purpose: stop requests, planned restarts (PLANNED_ENDS)."""
        return [a for a in self.attempts if a.planned]

    @property
    def restart_count(self) -> int:
        """Attempts started after the first (run.json's totals.restarts)."""
        return max(0, len(self.attempts) - 1)

    @property
    def layout(self) -> RunDir:
        return RunDir(self.run_dir)

    def metrics_by_attempt(self) -> dict[int, Group]:
        """Attempt number -> its metrics lines summed up (metrics_summary.Group): by their
        `attempt` field under a supervisor; by start time otherwise (`overnight train`
        numbers every process attempt 1). Do not modify."""
        return self.metrics.groups


def num(v: Any, default: float | None = None) -> float | None:
    """A finite number, else `default` (an old log's NaN is no measurement)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return default
    return float(v)


def whole(v: Any, default: int = 0) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default
