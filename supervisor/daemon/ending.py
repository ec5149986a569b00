"""How an attempt ended, read from everything it left: the facts for classify and the policy,
and the end fields of its entry in run.json.

`read_end()` gathers the facts (exit status, what the supervisor did to it, its last
WorkerStopping message, the tail of its output, its memory, its last step in
logs/metrics.jsonl) and classifies them (supervisor/daemon/classify.py). `end_fields()`
turns that and the policy's decision into the AttemptRecord fields the record keeps.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import strictjson
from shared.config import SupervisorOptions
from shared.protocol import WorkerStopping
from shared.run_record import Action, BadData, Detection
from shared.tail import tail_lines
from supervisor.daemon.attempt import Attempt
from supervisor.daemon.classify import Classification, ExitFacts, classify
from supervisor.daemon.policy import Decision, Outcome
from supervisor.daemon.state import Verdict

OUTPUT_TAIL_BYTES = 8192
OUTPUT_TAIL_LINES = 40
METRICS_TAIL_BYTES = 65536


@dataclass(frozen=True)
class Ending:
    """What is known about an attempt that ended."""

    classification: Classification
    end_step: int  # the last step it reached
    detected_by: Detection
    latency: float  # seconds from its last sign of life (or the detection) to noticing
    stderr_tail: str
    stopping: WorkerStopping | None  # its last words, if they arrived


def read_end(attempt: Attempt, returncode: int, now: float, metrics_log: Path,
             opts: SupervisorOptions, disk: tuple[int, int] = (-1, 0)) -> Ending:
    """`disk`: (bytes free where the run writes, bytes a checkpoint needs), -1: unknown."""
    view, mem = attempt.view, attempt.mem
    tail = stderr_tail(attempt.output)
    stopping = view.stopping if isinstance(view.stopping, WorkerStopping) else None
    last = mem.last
    if attempt.noticed is not None:
        by, detail, latency = (attempt.noticed.by, attempt.noticed.detail,
                               attempt.noticed.seconds)
    else:
        by, detail, latency = Detection.EXIT, "", since_last_sign(attempt, now)
    c = classify(ExitFacts(
        returncode=returncode, stop_reason=attempt.stop_reason,
        killed_by_supervisor=attempt.stopping.killed,
        stopping_reason=stopping.reason if stopping else "",
        stopping_detail=stopping.detail if stopping else "",
        first_bad_step=stopping.first_bad_step if stopping else -1,
        data_position=stopping.data_position if stopping else -1,
        data_batch=stopping.data_batch if stopping else -1,
        data_lines=stopping.data_lines if stopping else "",
        stderr_tail=tail, memory_mb=last.worker_mb if last else view.active_mb,
        memory_limit_mb=opts.memory_limit_mb,
        available_fraction=last.available_fraction if last else 1.0, stop_detail=detail,
        disk_free=disk[0], disk_needed=disk[1],
    ))
    # Telemetry goes out in batches and dies with the process: the worker's own metrics
    # file (written every step) knows the last step for sure.
    end_step = max(view.step, stopping.step if stopping else 0,
                   last_logged_step(metrics_log, attempt.number))
    return Ending(c, end_step, by, latency, tail, stopping)


def outcome(attempt: Attempt, ending: Ending) -> Outcome:
    """The policy's view of the ending (supervisor/daemon/policy.py)."""
    c, stopping = ending.classification, ending.stopping
    return Outcome(c.failure, c.detail, attempt.view.start_step, ending.end_step,
                   c.first_bad_step, attempt.user_stop, attempt.lr_scale, c.data_position,
                   c.data_batch, c.data_lines,
                   first_bad_position=stopping.first_bad_position if stopping else -1,
                   signal=c.signal, stop_note=attempt.stop_note)


def end_fields(attempt: Attempt, ending: Ending, decision: Decision,
               changed: dict[str, Any], downtime: float | None) -> dict[str, Any]:
    """The AttemptRecord fields (shared/run_record.py) known once the attempt has ended."""
    view, mem, c = attempt.view, attempt.mem, ending.classification
    return {
        "end_step": ending.end_step, "steps_gained": ending.end_step - view.start_step,
        "exit_code": c.exit_code, "signal": c.signal, "signal_name": c.signal_name,
        "classification": c.failure, "detail": c.detail, "detected_by": ending.detected_by,
        "detection_latency_s": round(ending.latency, 3),
        "killed_after_stop_timeout": attempt.stopping.killed,
        "time_to_first_heartbeat_s": _since(view.first_heartbeat_at, view.spawned_at),
        "time_to_first_step_s": _since(view.first_step_at, view.spawned_at),
        "downtime_s": downtime, "tokens": view.tokens,
        "tokens_per_sec_avg": _round(view.tokens_per_sec),
        "peak_rss_mb": round(mem.peak_rss_mb, 1),
        "peak_mlx_mb": round(max(mem.peak_mlx_mb, view.peak_mlx_mb), 1),
        "min_available_mb": _round(mem.min_available_mb),
        "stderr_tail": ending.stderr_tail, "action": Action(decision.action),
        "action_reason": decision.reason,
        "restart_delay_s": round(decision.delay, 3) if decision.verdict is Verdict.RESTART
        else None,
        "settings_changed": changed,
        "bad_data": BadData(c.data_position, c.data_batch, c.data_lines, attempt.lr_scale)
        if c.data_position >= 0 else None,
    }


def stderr_tail(path: Path) -> str:
    """The last lines of an attempt's output file."""
    lines = tail_lines(path, OUTPUT_TAIL_BYTES)[-OUTPUT_TAIL_LINES:]
    return "\n".join(line.decode("utf-8", "replace") for line in lines)


def last_logged_step(metrics_log: Path, attempt: int) -> int:
    """The last step this attempt wrote to logs/metrics.jsonl (0 if none); reads the tail."""
    for raw in reversed(tail_lines(metrics_log, METRICS_TAIL_BYTES)):
        try:
            m = strictjson.loads(raw)
        except ValueError:
            continue  # a half-written last line (or one no JSON parser should take)
        if isinstance(m, dict) and m.get("attempt") == attempt and isinstance(m.get("step"), int):
            return int(m["step"])
    return 0


def since_last_sign(attempt: Attempt, now: float) -> float:
    """Seconds since the worker's last sign of life: its last message or its last output."""
    latency = now - attempt.view.last_seen
    with contextlib.suppress(OSError):
        latency = min(latency, max(0.0, time.time() - attempt.output.stat().st_mtime))
    return latency


def _since(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 3)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)
