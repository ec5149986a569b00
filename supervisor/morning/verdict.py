"""The one-line verdict on a run and the live progress line, for `overnight report` and status.

    finished 2000/2000 steps in 7h42m; 2 restarts (OOM at 812 → micro-batch 8→4; hang at
    1530); best val 1.840 at step 1750

    early-stopped at step 80/200 after 31s (validation loss stopped improving); 3 restarts:
    1 after a failure (injected crash at 18), 2 planned (memory restart at 41; stop on request
    at 41); best val 1.874 at step 80

Restarts are the attempts after the first (run.json's totals.restarts); when some of them
followed a planned end (supervisor/morning/facts.py PLANNED_ENDS: a stop on request, a
planned restart for memory) they are counted apart from those after a failure. "best" is
always the lowest validation loss and its step (the worker's, as run.json's best_checkpoint
and COMPLETE hold it); a fault injected on purpose (debug.inject) is called "injected".

API for `overnight status` (supervisor/morning/status.py):

    verdict(run_dir, record: RunRecord | None, live: RunStatus | None = None) -> str
        One line from the run record, with a live status reply's state, step, checkpoints
        and best laid over it (the reply is newer: run.json is rewritten at most every 2 s
        while only the step or the best changes); reads no logs when there is a record.
        record=None: derived from the run directory's logs (a run trained with
        `overnight train` alone).
    progress_line(run_dir, total_steps, latest, best) -> str | None
        The worker's familiar progress line (`Training: 45% | step 900/2000 | loss=...`)
        rebuilt from the tail of logs/metrics.jsonl; the live status supplies total_steps and
        the checkpoints; the best it shows is `best` (the live one) when given. None before
        the first step.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections import Counter
from pathlib import Path

from shared.exitcodes import FailureClass as F
from shared.progress import Progress
from shared.run_record import (
    Action,
    BestCheckpoint,
    Detection,
    LatestCheckpoint,
    RunRecord,
    State,
)
from supervisor.daemon.control import RunStatus
from supervisor.morning.facts import Attempt, Outcome, RunFacts, Unclassified, Unsupervised
from supervisor.morning.runfacts import gather
from supervisor.morning.runlogs import tail_jsonl

KIND: dict[Outcome, str] = {
    F.CRASH: "crash", F.OOM: "OOM", F.GPU_WATCHDOG: "GPU watchdog", F.HANG: "hang",
    F.STALL: "stall", F.NON_FINITE: "NaN loss", F.GRAD_SPIKE: "gradient spike",
    F.PLANNED_RESTART: "memory restart", F.GRACEFUL_STOP: "stop on request",
    Unclassified.KILLED: "killed", Unclassified.ABANDONED: "supervisor restart",
    F.BAD_CONFIG: "bad config or data", F.METAL_RESOURCE_LIMIT: "Metal resource limit",
    F.MACHINE_RESTARTED: "machine restart", F.BATTERY_PAUSE: "battery pause",
}
# Attempts after which the run went no further on its own (not a restart).
ENDED_FOR_GOOD = frozenset({F.COMPLETED, F.EARLY_STOPPED, Unclassified.RUNNING,
                            Unclassified.UNKNOWN})
METRICS_TAIL_BYTES = 512_000
EVENTS_TAIL_BYTES = 256_000
SETTING_NAMES = {"batch_size": "micro-batch", "grad_accumulation_steps": "accumulation"}
MAX_LISTED = 4


def duration(seconds: float | None) -> str:
    """7h42m, 12m05s, 17s, 2d03h."""
    if seconds is None or math.isnan(seconds):
        return "?"
    s = round(seconds)
    if seconds < 0.1:
        return f"{seconds * 1000:.0f}ms"
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def clock(t: float | None) -> str:
    """A moment as local wall-clock time, 23:41:07 ("?" when unknown)."""
    if t is None or math.isnan(t):
        return "?"
    return dt.datetime.fromtimestamp(t).strftime("%H:%M:%S")


def kind(ending: Outcome | Attempt) -> str:
    """How an ending is named in the verdict, the report and the picture: "OOM", "hang"; an
    attempt's: a planned restart before Metal's resource limit is a "worker recycle"."""
    if isinstance(ending, Attempt):
        if ending.detected_by is Detection.RECYCLE:
            return "worker recycle"
        ending = ending.outcome
    return KIND.get(ending, str(ending.value).replace("_", " "))


def failure_note(a: Attempt, following: Attempt | None) -> str:
    """`OOM at 812 → micro-batch 8→4`, `NaN loss at 512 → rolled back to 500, lr ×0.5`,
    `injected crash at 70` (a fault injected on purpose)."""
    text = ("injected " if a.injected_by else "") + f"{kind(a)} at {a.end_step}"
    changes = []
    for key, pair in (a.settings_changed or {}).items():
        if key == "lr_scale" or not isinstance(pair, list) or len(pair) != 2:
            continue
        if key == "grad_checkpoint":
            changes.append("gradient checkpointing " + ("on" if pair[1] else "off"))
        elif key in SETTING_NAMES:
            changes.append(f"{SETTING_NAMES[key]} {pair[0]}→{pair[1]}")
    if a.action is Action.ROLLBACK and following is not None:
        back = following.resumed_from if following.resumed_from is not None else 0
        lr = f", lr ×{following.lr_scale:g}" if following.lr_scale else ""
        changes.insert(0, f"rolled back to {back}{lr}")
    if a.action == "skip_batch":  # supervisor/policy.py: the same batch non-finite again
        changes.insert(0, "that batch skipped (its data, not divergence)")
    return text + (" → " + ", ".join(changes) if changes else "")


def restarts(attempts: list[Attempt]) -> list[tuple[Attempt, Attempt | None]]:
    """(attempt, the one after it) for every attempt that ended and was followed by another
    (or by nothing yet, while the supervisor backs off)."""
    out = []
    for i, a in enumerate(attempts):
        following = attempts[i + 1] if i + 1 < len(attempts) else None
        if following is not None or (a.outcome not in ENDED_FOR_GOOD
                                     and a.action not in (None, Action.GIVE_UP, Action.STOP)):
            out.append((a, following))
    return out


def _notes(pairs: list[tuple[Attempt, Attempt | None]]) -> str:
    if len(pairs) <= MAX_LISTED:
        return "; ".join(failure_note(a, f) for a, f in pairs)
    kinds = Counter(("injected " if a.injected_by else "") + kind(a) for a, _ in pairs)
    return ", ".join(f"{k} ×{c}" for k, c in kinds.most_common())


def _restart_text(facts: RunFacts) -> str:
    pairs = restarts(facts.attempts)
    if not pairs:
        return "no restarts"
    by_hand = "" if facts.supervised else " by hand"
    n = len(pairs)
    head = f"{n} restart{'s' if n != 1 else ''}{by_hand}"
    planned = [(a, f) for a, f in pairs if a.planned]
    if not planned:
        return f"{head} ({_notes(pairs)})"
    parts = []
    unplanned = [(a, f) for a, f in pairs if not a.planned]
    if unplanned:
        after = "a failure" if len(unplanned) == 1 else "failures"
        parts.append(f"{len(unplanned)} after {after} ({_notes(unplanned)})")
    parts.append(f"{len(planned)} planned ({_notes(planned)})")
    return f"{head}: " + ", ".join(parts)


def _best_text(facts: RunFacts) -> str:
    if facts.best is None:
        return "no validation loss" if not facts.evals else ""
    step, val = facts.best
    return f"best val {val:.3f} at step {step}"


def describe(facts: RunFacts) -> str:
    """The verdict line for gathered facts."""
    steps = f"{facts.final_step}/{facts.total_steps or '?'}"
    wall = duration(facts.wall_seconds)
    last = facts.attempts[-1] if facts.attempts else None
    state = facts.state
    if state is State.FINISHED:
        head = f"finished {steps} steps in {wall}"
    elif state is State.EARLY_STOPPED:
        validated = bool(facts.evals) or facts.best is not None  # light facts: no logs read
        watched = "validation loss" if validated else "smoothed training loss"
        head = f"early-stopped at step {steps} after {wall} ({watched} stopped improving)"
    elif state is State.GAVE_UP:
        head = f"GAVE UP at step {steps} after {wall}: {facts.reason or '?'}"
    elif state is State.STOPPED:
        head = f"stopped at step {steps} after {wall} ({facts.reason or 'stop requested'})"
    elif state is Unsupervised.INCOMPLETE:
        why = kind(last) if last else "nothing ran"
        head = (f"INCOMPLETE at step {steps} after {wall}: the last worker ended ({why}) and "
                "nothing restarted it")
    elif state is State.BACKING_OFF:
        head = f"restarting at step {steps}, running for {wall}"
    else:  # running
        pct = f" ({100 * facts.final_step / facts.total_steps:.0f}%)" if facts.total_steps else ""
        head = f"training: step {steps}{pct}, running for {wall}"
    if not facts.supervised and (facts.finished or state is Unsupervised.INCOMPLETE):
        head += " (overnight train, no supervisor)"
    parts = [head, _restart_text(facts)]
    best = _best_text(facts)
    if best:
        parts.append(best)
    if facts.test is not None:
        parts.append(f"test loss {facts.test[0]:.3f}")
    return "; ".join(parts)


def verdict(run_dir: Path, record: RunRecord | None, live: RunStatus | None = None) -> str:
    """One line: how the run went (see the module docstring). The live status is newer than
    the record: its state, step, total and (when it has one) reason win."""
    run_dir = Path(run_dir)
    if record is not None and live is not None:
        changes: dict[str, object] = {"state": live.state}
        if live.best_checkpoint is not None:
            changes["best_checkpoint"] = live.best_checkpoint
        if live.latest_checkpoint is not None:
            changes["latest_checkpoint"] = live.latest_checkpoint
        if live.reason:
            changes["reason"] = live.reason
        if live.total_steps:
            changes["total_steps"] = live.total_steps
        if live.step is not None:
            changes["final_step"] = live.step
        record = dataclasses.replace(record, **changes)  # type: ignore[arg-type]
    return describe(gather(run_dir, record=record, light=True))


def progress_line(run_dir: Path, total_steps: int | None = None,
                  latest: LatestCheckpoint | None = None,
                  best: BestCheckpoint | None = None, attempt: int | None = None) -> str | None:
    """The worker's progress line for the newest steps in logs/metrics.jsonl (see above);
    `attempt` (a live status's): None if that attempt has written no step yet."""
    run_dir = Path(run_dir)
    tail = [m for m in tail_jsonl(run_dir / "logs" / "metrics.jsonl", METRICS_TAIL_BYTES)
            if "step" in m]
    if not tail or (attempt is not None and tail[-1].get("attempt") != attempt):
        return None
    attempt = tail[-1].get("attempt")
    tail = [m for m in tail if m.get("attempt") == attempt]
    total = total_steps if total_steps else int(tail[-1]["step"])
    prog = Progress(total_steps=total)
    for m in tail:
        prog.record_step(int(m["step"]), float(m.get("loss", math.nan)), float(m.get("lr", 0.0)),
                         int(m.get("tokens", 0)), float(m.get("step_seconds", 0.0)),
                         float(m.get("active_mb", 0.0)))
    events = tail_jsonl(run_dir / "logs" / "worker.jsonl", EVENTS_TAIL_BYTES)
    evals = [e for e in events if e.get("event") == "evaluated"]
    if evals:
        prog.val, prog.best_val = evals[-1].get("val_loss"), evals[-1].get("best_val_loss")
    if best is not None:  # the supervisor's (status: the live one, as its other lines)
        prog.best_val = best.val_loss
    saved = [e.get("step") for e in events if e.get("event") == "checkpoint_saved"]
    if latest is not None:
        saved.append(latest.step)
    prog.last_checkpoint_step = max((s for s in saved if isinstance(s, int)), default=0)
    return prog.line()
