"""What happened in a run, gathered from everything it left behind, for the verdict and report.

Sources, each optional and read defensively (a field missing from run.json is a gap in the
report, never an error):

    run.json            the supervisor's record: attempts, how each ended, what was done
    logs/metrics.jsonl  one line per step (shared.protocol.StepMetrics.to_dict())
    logs/worker.jsonl   evaluations, data problems, progress/ETA, each process's start and stop
    COMPLETE            the worker's marker: final step, best step and validation loss,
                        the test loss when the config asked for mlx_lm's test pass
    checkpoints/        which checkpoints exist; adapters/: the final adapters

A run trained with `overnight train` alone has no run.json: its attempts are the worker
processes found in worker.jsonl (one `worker_started` each), and it has no supervisor actions.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.layout import RunDir
from supervisor import record as record_mod
from supervisor.runlogs import parse_time, read_jsonl, read_run_logs

RUNNING_STATES = ("starting", "training", "stopping", "backing_off", "restarting")
# A worker log untouched for this long, without a stop message, belongs to a dead process.
QUIET_SECONDS = 300.0
WORKER_EVENTS = frozenset({
    "worker_started", "worker_stopping", "resumed", "evaluated", "data_lines_skipped",
    "data_loaded", "data_seen", "progress", "run_complete", "config_resolved", "worker_crashed",
})
# worker/data.py's summary of a data file: data_loaded / data_lines_skipped at load, data_seen
# as streaming reads the first epoch (the last one per file is what is known).
DATA_EVENTS = frozenset({"data_lines_skipped", "data_loaded", "data_seen"})


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
    outcome: str = "unknown"  # shared.exitcodes.FailureClass value, "running" or "killed"
    detail: str = ""
    detected_by: str | None = None
    detection_latency_s: float | None = None
    action: str | None = None  # the supervisor's decision (None without a supervisor)
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

    @property
    def seconds(self) -> float | None:
        if self.ended is None or math.isnan(self.started):
            return None
        return max(0.0, self.ended - self.started)


@dataclass(frozen=True)
class RunFacts:
    run_dir: Path
    run_id: str
    supervised: bool  # there is a run.json
    state: str  # the record's state, or finished / early_stopped / running / incomplete
    reason: str
    total_steps: int
    final_step: int
    started: float
    ended: float | None  # None: still running
    attempts: list[Attempt]
    config: dict[str, Any]
    record: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)  # in file order
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, val_loss) by step
    best: tuple[int, float] | None = None  # (step, val_loss)
    progress: list[dict[str, Any]] = field(default_factory=list)  # worker "progress" events
    data_skipped: dict[str, int] = field(default_factory=dict)  # data file -> malformed lines
    data_files: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> DATA_EVENTS
    checkpoints: list[int] = field(default_factory=list)  # steps present, ascending
    quarantined: list[dict[str, Any]] = field(default_factory=list)
    complete: dict[str, Any] | None = None
    unreadable_lines: int = 0

    @property
    def finished(self) -> bool:
        return self.state in ("finished", "early_stopped")

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES or self.state == "running"

    @property
    def wall_seconds(self) -> float | None:
        end = self.ended if self.ended is not None else time.time()
        return None if math.isnan(self.started) else max(0.0, end - self.started)

    @property
    def test(self) -> tuple[float, int] | None:
        """(test loss, examples) of mlx_lm's test pass (`test: true`), from COMPLETE."""
        loss = _num((self.complete or {}).get("test_loss"))
        if loss is None:
            return None
        return loss, _int((self.complete or {}).get("test_examples"))

    @property
    def layout(self) -> RunDir:
        return RunDir(self.run_dir)

    def metrics_by_attempt(self) -> dict[int, list[dict[str, Any]]]:
        """Attempt number -> its metrics lines: by their `attempt` field under a supervisor;
        by start time otherwise (`overnight train` numbers every process attempt 1)."""
        out: dict[int, list[dict[str, Any]]] = {}
        starts = [a.started for a in self.attempts]
        for m in self.metrics:
            if self.supervised:
                key = _int(m.get("attempt"))
            else:
                t = _num(m.get("time"), 0.0) or 0.0
                key = max(1, sum(1 for s in starts if not math.isnan(s) and s <= t))
            out.setdefault(key, []).append(m)
        return out


# ---- reading ---------------------------------------------------------------------------


def _num(v: Any, default: float | None = None) -> float | None:
    """A finite number, else `default` (an old log's NaN is no measurement)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return default
    return float(v)


def _int(v: Any, default: int = 0) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def attempts_from_record(record: dict[str, Any]) -> list[Attempt]:
    out = []
    for i, a in enumerate(record.get("attempts") or [], 1):
        if not isinstance(a, dict):
            continue
        resumed = a.get("resumed_from")
        ended = parse_time(a.get("ended"))
        outcome = a.get("classification") or ("running" if a.get("ended") is None else
                                               "unknown")
        if a.get("action") == "abandoned":
            outcome = "abandoned"
        out.append(Attempt(
            number=_int(a.get("attempt"), i), pid=a.get("pid"),
            started=parse_time(a.get("started")),
            ended=None if math.isnan(ended) else ended,
            start_step=_int(a.get("start_step")), end_step=_int(a.get("end_step")),
            resumed_from=_int(resumed.get("step")) if isinstance(resumed, dict) else None,
            outcome=str(outcome), detail=str(a.get("detail") or ""),
            detected_by=a.get("detected_by"),
            detection_latency_s=_num(a.get("detection_latency_s")),
            action=a.get("action"), action_reason=str(a.get("action_reason") or ""),
            restart_delay_s=_num(a.get("restart_delay_s")), downtime_s=_num(a.get("downtime_s")),
            settings=a.get("settings") or {}, settings_changed=a.get("settings_changed") or {},
            lr_scale=_num(a.get("lr_scale")), skip_steps=_int(a.get("skip_steps")),
            tokens_per_sec=_num(a.get("tokens_per_sec_avg")),
            peak_mlx_mb=_num(a.get("peak_mlx_mb")), peak_rss_mb=_num(a.get("peak_rss_mb")),
            stderr_tail=str(a.get("stderr_tail") or ""), log=a.get("log"),
            bad_data=str((a.get("bad_data") or {}).get("lines") or "")
            if isinstance(a.get("bad_data"), dict) else "",
        ))
    return out


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


def attempts_from_logs(procs: list[_Proc], metrics: list[dict[str, Any]],
                       now: float, complete: bool) -> list[Attempt]:
    out = []
    for i, p in enumerate(procs):
        until = procs[i + 1].started if i + 1 < len(procs) else math.inf
        mine = [m for m in metrics if p.started <= _num(m.get("time"), 0.0) < until]  # type: ignore[operator]
        steps = [_int(m.get("step")) for m in mine]
        s = p.stopping or {}
        end_step = max([*steps, _int(s.get("step")), p.start_step])
        last = i + 1 == len(procs)
        if s:
            outcome, detail = str(s.get("reason") or "unknown"), str(s.get("detail") or "")
        elif last and not complete and now - p.last_seen < QUIET_SECONDS:
            outcome, detail = "running", ""
        else:
            outcome = "crash" if p.crashed else "killed"
            detail = ("uncaught exception (see the worker log)" if p.crashed else
                      "ended without a stop message: killed, aborted or out of memory")
        secs = sum(_num(m.get("step_seconds"), 0.0) or 0.0 for m in mine)
        toks = sum(_int(m.get("tokens")) for m in mine)
        peaks = [_num(m.get("peak_mb"), 0.0) or 0.0 for m in mine]
        rss = [_num(m.get("rss_mb"), 0.0) or 0.0 for m in mine]
        times = [_num(m.get("time"), 0.0) or 0.0 for m in mine]
        out.append(Attempt(
            number=i + 1, pid=p.pid, started=p.started,
            ended=None if outcome == "running" else max([p.last_seen, *times]),
            start_step=p.start_step, end_step=end_step, resumed_from=p.resumed_from,
            outcome=outcome, detail=detail, detected_by=None,
            tokens_per_sec=toks / secs if secs > 0 else None,
            peak_mlx_mb=max(peaks) if peaks else None, peak_rss_mb=max(rss) if rss else None,
            bad_data=str(s.get("data_lines") or ""),
        ))
    return out


def _load_complete(run: RunDir) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(run.complete_marker.read_text())
        return data if isinstance(data, dict) else {}
    return {} if run.complete_marker.exists() else None


def _checkpoint_steps(run: RunDir) -> list[int]:
    steps = []
    if run.checkpoints.is_dir():
        for p in run.checkpoints.iterdir():
            digits = p.name.removeprefix("step-")
            if p.is_dir() and p.name.startswith("step-") and digits.isdigit() and \
                    (p / "manifest.json").is_file():
                steps.append(int(digits))
    return sorted(steps)


def gather(run_dir: Path, record: dict[str, Any] | None = None, light: bool = False,
           now: float | None = None) -> RunFacts:
    """Everything known about the run in `run_dir`.

    `record`: the run record if the caller has it (e.g. a live status reply's source);
    otherwise run.json is read. `light`: for a one-line verdict: with a record, read no logs
    or metrics; without one, read the worker log but not the metrics.
    """
    now = time.time() if now is None else now
    run = RunDir(run_dir)
    if record is None:
        record = record_mod.load(run.record)
    if record is not None and not isinstance(record.get("attempts"), list):
        record = None if not record.get("run_id") else record
    complete = _load_complete(run)
    read_logs = not (light and record is not None)
    metrics, bad = ([], 0) if not read_logs else read_jsonl(run.metrics_log)

    procs: list[_Proc] = []
    evals: dict[int, float] = {}
    best: tuple[int, float] | None = None
    progress: list[dict[str, Any]] = []
    skipped: dict[str, int] = {}
    data_files: dict[str, dict[str, Any]] = {}
    config: dict[str, Any] = dict(record.get("config") or {}) if record else {}
    first_seen = last_seen = math.nan
    by_pid: dict[Any, _Proc] = {}
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
                proc = _Proc(d.get("pid"), _int(d.get("attempt"), 1), t, t)
                by_pid[proc.pid] = proc
                procs.append(proc)
            elif ev == "resumed" and proc is not None:
                proc.start_step = proc.resumed_from = _int(d.get("step"))
            elif ev == "worker_stopping" and proc is not None:
                proc.stopping = d
            elif ev == "worker_crashed" and proc is not None:
                proc.crashed = True
            elif ev == "evaluated" and _num(d.get("val_loss")) is not None:
                evals[_int(d.get("step"))] = float(d["val_loss"])
                if _num(d.get("best_val_loss")) is not None:
                    best = (_int(d.get("best_step")), float(d["best_val_loss"]))
            elif ev == "progress":
                progress.append({"time": t, **d})
            elif ev in DATA_EVENTS and d.get("path"):
                skipped[str(d["path"])] = _int(d.get("malformed"))
                data_files[str(d["path"])] = d
            elif ev == "config_resolved" and not config and isinstance(d.get("config"), dict):
                config = d["config"]

    if record is not None:
        attempts = attempts_from_record(record)
        state, reason = str(record.get("state") or "unknown"), str(record.get("reason") or "")
        started = parse_time(record.get("created"))
        ended = parse_time(record.get("ended")) if record.get("ended") else None
        total = _int(record.get("total_steps")) or _int(config.get("iters"))
        final = _int(record.get("final_step"))
        bc = record.get("best_checkpoint")
        if isinstance(bc, dict) and _num(bc.get("val_loss")) is not None:
            best = (_int(bc.get("step")), float(bc["val_loss"]))
        run_id = str(record.get("run_id") or run_dir.name)
    else:
        attempts = attempts_from_logs(procs, metrics, now, complete is not None)
        last = attempts[-1] if attempts else None
        if complete is not None:
            state = "early_stopped" if complete.get("status") == "early_stopped" else "finished"
            reason = str(complete.get("status") or "")
        elif last is not None and last.outcome == "running":
            state, reason = "running", ""
        else:
            state = "incomplete"
            reason = f"the last worker ended: {last.outcome}" if last else "no worker ran"
        started, ended = first_seen, (None if state == "running" else last_seen)
        if ended is not None and math.isnan(ended):
            ended = None
        total = _int((complete or {}).get("total_steps")) or _int(config.get("iters"))
        steps = [_int(m.get("step")) for m in metrics] + [a.end_step for a in attempts]
        final = max([*steps, _int((complete or {}).get("step"))])
        run_id = _run_id(run, metrics)
    if complete and _num(complete.get("best_val_loss")) is not None and best is None:
        best = (_int(complete.get("best_step")), float(complete["best_val_loss"]))

    return RunFacts(
        run_dir=run_dir, run_id=run_id, supervised=record is not None, state=state,
        reason=reason, total_steps=total, final_step=final, started=started, ended=ended,
        attempts=attempts, config=config, record=record, metrics=metrics,
        evals=sorted(evals.items()), best=best, progress=progress,
        data_skipped={k: v for k, v in skipped.items() if v}, data_files=data_files,
        checkpoints=_checkpoint_steps(run),
        quarantined=list(record.get("quarantined") or []) if record else [],
        complete=complete, unreadable_lines=bad,
    )


def _run_id(run: RunDir, metrics: list[dict[str, Any]]) -> str:
    with contextlib.suppress(OSError):
        text = (run.root / "run_id").read_text().strip()
        if text:
            return text
    if metrics and metrics[-1].get("run_id"):
        return str(metrics[-1]["run_id"])
    return run.root.name
