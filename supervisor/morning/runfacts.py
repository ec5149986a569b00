"""What happened in a run, gathered from everything it left behind, for the verdict and report.

Sources, each optional; the logs are read defensively (an unreadable line is counted, never an
error), the record through its type (shared/run_record.py: a run.json that is not one is a
one-line error naming the field):

    run.json            the supervisor's record: attempts, how each ended, what was done
    logs/metrics.jsonl  one line per step (shared.protocol.StepMetrics.to_dict())
    logs/worker.jsonl   evaluations, data problems, progress/ETA, each process's start and stop
    COMPLETE            the worker's marker: final step, best step and validation loss,
                        the test loss when the config asked for mlx_lm's test pass
    checkpoints/        which checkpoints exist; adapters/: the final adapters

A run trained with `overnight train` alone has no run.json: its attempts are the worker
processes found in worker.jsonl (one `worker_started` each), and it has no supervisor actions.
The facts' types are supervisor/morning/facts.py.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from shared import run_record
from shared.completion import read_marker
from shared.exitcodes import FailureClass
from shared.faults import ENDS
from shared.layout import RunDir
from shared.run_record import Action, AttemptRecord, RunRecord, State
from supervisor.morning import machine_night, metrics_split
from supervisor.morning.eta_marks import EtaMarks
from supervisor.morning.facts import (
    Attempt,
    Outcome,
    RunFacts,
    RunState,
    Unclassified,
    Unsupervised,
    num,
    whole,
)
from supervisor.morning.metrics_summary import MetricsSummary, Plan, Window, summarize
from supervisor.morning.runlogs import parse_time, read_run_logs


class _Read(Enum):
    RECORD = "read run.json"


READ = _Read.RECORD  # gather(): read the record from the run directory
# A worker log untouched for this long, without a stop message, belongs to a dead process.
QUIET_SECONDS = 300.0
WORKER_EVENTS = frozenset({
    "worker_started", "worker_stopping", "resumed", "evaluated", "data_lines_skipped",
    "data_loaded", "data_seen", "progress", "run_complete", "config_resolved", "worker_crashed",
    "fault_injected",
})
# worker/data.py's summary of a data file: data_loaded / data_lines_skipped at load, data_seen
# as streaming reads the first epoch (the last one per file is what is known).
DATA_EVENTS = frozenset({"data_lines_skipped", "data_loaded", "data_seen"})
# Injected faults that end the worker without a stop message (shared/faults.py).
ABORTING = frozenset({"crash", "oom", "gpu_watchdog", "checkpoint_crash"})


def attempts_from_record(record: RunRecord) -> list[Attempt]:
    return [_attempt(a) for a in record.attempts]


def _attempt(a: AttemptRecord) -> Attempt:
    ended = parse_time(a.ended)
    outcome: Outcome = a.classification or (
        Unclassified.RUNNING if a.ended is None else Unclassified.UNKNOWN)
    if a.action is Action.ABANDONED and a.classification is None:  # not a machine restart
        outcome = Unclassified.ABANDONED
    return Attempt(
        number=a.attempt, pid=a.pid, started=parse_time(a.started),
        ended=None if math.isnan(ended) else ended,
        start_step=a.start_step, end_step=a.end_step,
        resumed_from=a.resumed_from.step if a.resumed_from is not None else None,
        outcome=outcome, detail=a.detail, detected_by=a.detected_by,
        detection_latency_s=a.detection_latency_s, action=a.action,
        action_reason=a.action_reason, restart_delay_s=a.restart_delay_s,
        downtime_s=a.downtime_s, settings=a.settings, settings_changed=a.settings_changed,
        lr_scale=a.lr_scale, skip_steps=a.skip_steps, tokens_per_sec=a.tokens_per_sec_avg,
        peak_mlx_mb=a.peak_mlx_mb, peak_rss_mb=a.peak_rss_mb, stderr_tail=a.stderr_tail,
        log=_failed_rank_log(a), bad_data=a.bad_data.lines if a.bad_data is not None else "",
        injected=a.injected,
    )


def _failed_rank_log(a: AttemptRecord) -> str:
    """The log whose end stderr_tail is: the failed rank's (a group), else the attempt's."""
    rank = next((r for r in a.ranks if r.rank == a.failed_rank), None)
    return f"logs/{rank.log}" if rank is not None and rank.log else a.log


@dataclass
class _Proc:
    """A worker process seen in worker.jsonl (runs without a record)."""

    pid: Any
    attempt: int
    started: float
    last_seen: float
    start_step: int = 0
    resumed_from: int | None = None
    stopping: dict[str, Any] | None = None
    crashed: bool = False
    injected: tuple[str, ...] = ()  # fault_injected events of this process


def attempts_from_logs(procs: list[_Proc], windows: list[Window],
                       now: float, complete: bool) -> list[Attempt]:
    """The worker processes of a run without run.json as attempts; `windows`: each one's
    metrics lines (metrics_summary.Window, same order)."""
    out = []
    for i, (p, mine) in enumerate(zip(procs, windows, strict=True)):
        s = p.stopping or {}
        end_step = max(mine.max_step if mine.n else 0, whole(s.get("step")), p.start_step)
        last = i + 1 == len(procs)
        outcome: Outcome
        if s:
            outcome, detail = _failure_class(s.get("reason")), str(s.get("detail") or "")
        elif last and not complete and now - p.last_seen < QUIET_SECONDS:
            outcome, detail = Unclassified.RUNNING, ""
        elif aborted := _aborting_fault(p.injected):
            # it said it would abort on purpose, and said nothing after: that is how it ended
            outcome = ENDS[aborted.partition("@")[0]]
            detail = f"aborted by the injected fault {aborted} (debug.inject)"
        else:
            outcome = FailureClass.CRASH if p.crashed else Unclassified.KILLED
            detail = ("uncaught exception (see the worker log)" if p.crashed else
                      "ended without a stop message: killed, aborted or out of memory")
        last_time = mine.max_time if mine.n else p.last_seen
        out.append(Attempt(
            number=i + 1, pid=p.pid, started=p.started,
            ended=None if outcome is Unclassified.RUNNING else max(p.last_seen, last_time),
            start_step=p.start_step, end_step=end_step, resumed_from=p.resumed_from,
            outcome=outcome, detail=detail, detected_by=None,
            tokens_per_sec=mine.tokens / mine.seconds if mine.seconds > 0 else None,
            peak_mlx_mb=mine.peak_mb if mine.n else None,
            peak_rss_mb=mine.rss_mb if mine.n else None,
            bad_data=str(s.get("data_lines") or ""), injected=p.injected,
        ))
    return out


def _aborting_fault(injected: tuple[str, ...]) -> str:
    """The last injected fault that ends the process without a stop message (a crash, an
    OOM, the GPU watchdog, a kill mid-checkpoint), or ""."""
    for name in reversed(injected):
        if name.partition("@")[0] in ABORTING:
            return name
    return ""


def _failure_class(reason: Any) -> Outcome:
    """A WorkerStopping reason (a FailureClass value) as read from the worker log."""
    try:
        return FailureClass(reason)
    except ValueError:
        return Unclassified.UNKNOWN


def _checkpoint_steps(run: RunDir) -> list[int]:
    steps = []
    if run.checkpoints.is_dir():
        for p in run.checkpoints.iterdir():
            digits = p.name.removeprefix("step-")
            if p.is_dir() and p.name.startswith("step-") and digits.isdigit() and \
                    (p / "manifest.json").is_file():
                steps.append(int(digits))
    return sorted(steps)


def gather(run_dir: Path, record: RunRecord | _Read | None = READ, light: bool = False,
           now: float | None = None, meanwhile: Callable[[], None] | None = None,
           meanwhile_s: float = 0.0) -> RunFacts:
    """Everything known about the run in `run_dir`.

    `record`: the run record if the caller has it (None: the run has none); by default
    run.json is read (RecordError if it is not a run record). `light`: for a one-line
    verdict: with a record, read no logs or metrics; without one, read the worker log but not
    the metrics. `meanwhile`: called once the worker log is read, while a helper process
    parses the metrics' tail (metrics_split.py), taking about `meanwhile_s` seconds (report:
    importing matplotlib).
    """
    now = time.time() if now is None else now
    run = RunDir(run_dir)
    if isinstance(record, _Read):
        record = run_record.load(run.record)
    complete = read_marker(run)
    read_logs = not (light and record is not None)
    with contextlib.ExitStack() as stack:
        split = stack.enter_context(metrics_split.start(
            run.metrics_log, _bytes(run.logs.glob("worker*.jsonl*")), meanwhile_s)) \
            if read_logs else None
        return _gather(run_dir, run, record, complete, read_logs, now, split, meanwhile)


def _bytes(paths: Iterable[Path]) -> int:
    total = 0
    for p in paths:
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total


def _gather(run_dir: Path, run: RunDir, record: RunRecord | None, complete: dict[str, Any] | None,
            read_logs: bool, now: float, split: metrics_split.Split | None,
            meanwhile: Callable[[], None] | None) -> RunFacts:

    procs: list[_Proc] = []
    evals: dict[int, float] = {}
    best: tuple[int, float] | None = None
    eta = EtaMarks()  # the progress events the ETA table reads (~100k a 1M-step night)
    skipped: dict[str, int] = {}
    data_files: dict[str, dict[str, Any]] = {}
    config: dict[str, Any] = dict(record.config) if record else {}
    first_seen = last_seen = math.nan
    eval_events = 0
    by_pid: dict[Any, _Proc] = {}

    def total_steps() -> int:
        said = record.total_steps if record else whole((complete or {}).get("total_steps"))
        return said or whole(config.get("iters"))

    eta.know_total(total_steps())
    if read_logs:
        for line in read_run_logs(run_dir, sources=("worker",)):
            d, t = line.data, line.time
            if not math.isnan(t):
                first_seen = t if math.isnan(first_seen) else min(first_seen, t)
                last_seen = t if math.isnan(last_seen) else max(last_seen, t)
            proc = by_pid.get(d.get("pid"))
            if proc is not None and not math.isnan(t):
                proc.last_seen = max(proc.last_seen, t)
            ev = line.event
            if ev not in WORKER_EVENTS:
                continue
            if ev == "worker_started":
                proc = _Proc(d.get("pid"), whole(d.get("attempt"), 1), t, t)
                by_pid[proc.pid] = proc
                procs.append(proc)
            elif ev == "resumed" and proc is not None:
                proc.start_step = proc.resumed_from = whole(d.get("step"))
            elif ev == "worker_stopping" and proc is not None:
                proc.stopping = d
            elif ev == "worker_crashed" and proc is not None:
                proc.crashed = True
            elif ev == "fault_injected" and proc is not None and d.get("fault"):
                proc.injected = (*proc.injected, str(d["fault"]))
            elif ev == "evaluated" and num(d.get("val_loss")) is not None:
                eval_events += 1
                evals[whole(d.get("step"))] = float(d["val_loss"])
                if num(d.get("best_val_loss")) is not None:
                    best = (whole(d.get("best_step")), float(d["best_val_loss"]))
            elif ev == "progress":
                eta.add({"time": t, "step": d.get("step"), "eta_h": d.get("eta_h")})
            elif ev in DATA_EVENTS and d.get("path"):
                skipped[str(d["path"])] = whole(d.get("malformed"))
                data_files[str(d["path"])] = d
            elif ev == "config_resolved" and not config and isinstance(d.get("config"), dict):
                config = d["config"]
                eta.know_total(total_steps())

    attempts = attempts_from_record(record) if record is not None else []
    if meanwhile is not None:
        meanwhile()
    metrics = summarize(run.metrics_log, _plan(run_dir, record, attempts, procs, evals),
                        split.pieces() if split is not None else None) \
        if read_logs else MetricsSummary()
    state: RunState
    if record is not None:
        state, reason = record.state, record.reason
        started = parse_time(record.created)
        ended = parse_time(record.ended) if record.ended else None
        total = total_steps()
        final = record.final_step
        bc = record.best_checkpoint
        if bc is not None and num(bc.val_loss) is not None:
            best = (bc.step, bc.val_loss)
        run_id = record.run_id or run_dir.name
    else:
        attempts = attempts_from_logs(procs, metrics.windows, now, complete is not None)
        last = attempts[-1] if attempts else None
        if complete is not None:
            state = (State.EARLY_STOPPED if complete.get("status") == "early_stopped"
                     else State.FINISHED)
            reason = str(complete.get("status") or "")
        elif last is not None and last.outcome is Unclassified.RUNNING:
            state, reason = Unsupervised.RUNNING, ""
        else:
            state = Unsupervised.INCOMPLETE
            reason = f"the last worker ended: {last.outcome.value}" if last else "no worker ran"
        started = first_seen
        ended = None if state is Unsupervised.RUNNING else last_seen
        if ended is not None and math.isnan(ended):
            ended = None
        total = total_steps()
        final = max([metrics.max_step if metrics else 0,
                     *(a.end_step for a in attempts), whole((complete or {}).get("step"))])
        run_id = _run_id(run, metrics)
    if complete and num(complete.get("best_val_loss")) is not None and best is None:
        best = (whole(complete.get("best_step")), float(complete["best_val_loss"]))

    return RunFacts(
        run_dir=run_dir, run_id=run_id, supervised=record is not None, state=state,
        reason=reason, total_steps=total, final_step=final, started=started, ended=ended,
        attempts=attempts, config=config, record=record, metrics=metrics,
        evals=sorted(evals.items()), best=best, progress=eta.events(total),
        data_skipped={k: v for k, v in skipped.items() if v}, data_files=data_files,
        checkpoints=_checkpoint_steps(run),
        quarantined=record.quarantined if record else (),
        complete=complete, unreadable_lines=metrics.unreadable, eval_events=eval_events,
    )


def _plan(run_dir: Path, record: RunRecord | None, attempts: list[Attempt],
          procs: list[_Proc], evals: dict[int, float]) -> Plan:
    """What the metrics summary must keep apart (metrics_summary.Plan): the attempts (by
    field under a supervisor, by start time without), the steps each restart redid, the
    throttled stretches, the evaluated steps."""
    if record is not None:
        pairs = list(itertools.pairwise(attempts))
        periods = tuple((p.start, p.end) for p in
                        machine_night.read_dir(run_dir, True, attempts).throttled)
        return Plan(redo_after={a.number: b.resumed_from or 0 for a, b in pairs},
                    periods=periods, evals=frozenset(evals))
    starts = sorted(p.started for p in procs if not math.isnan(p.started))
    return Plan(starts=np.array(starts, np.float64),
                windows=tuple(p.started for p in procs),
                redo_after={i + 1: b.resumed_from or 0 for i, b in enumerate(procs[1:])},
                evals=frozenset(evals))


def _run_id(run: RunDir, metrics: MetricsSummary) -> str:
    with contextlib.suppress(OSError):
        text = (run.root / "run_id").read_text().strip()
        if text:
            return text
    return metrics.run_id or run.root.name
