"""The one-line verdict on a run and the live progress line, for `overnight report` and status.

    finished 2000/2000 steps in 7h42m; 2 restarts (OOM at 812 → micro-batch 8→4; hang at
    1530); best val 1.840 at step 1750

API for `overnight status` (supervisor/control_client.py):

    verdict(record: dict | None, run_dir: Path) -> str
        One line from a run record (run.json, or the dict a live status reply came from);
        reads no logs when a record is given. record=None: derived from the run directory
        (a run trained with `overnight train` alone).
    progress_line(run_dir: Path, status: dict | None = None) -> str | None
        The worker's familiar progress line (`Training: 45% | step 900/2000 | loss=...`)
        rebuilt from the tail of logs/metrics.jsonl; `status` (a live status reply or the
        record) supplies total_steps and the checkpoints. None before the first step.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

from supervisor import record as record_mod
from supervisor.runfacts import Attempt, RunFacts, gather
from supervisor.runlogs import tail_jsonl

KIND = {
    "crash": "crash", "oom": "OOM", "gpu_watchdog": "GPU watchdog", "hang": "hang",
    "stall": "stall", "non_finite": "NaN loss", "grad_spike": "gradient spike",
    "planned_restart": "memory restart", "graceful_stop": "stop", "killed": "killed",
    "abandoned": "supervisor restart", "bad_config": "bad config or data",
}
ENDED_FOR_GOOD = frozenset({"completed", "early_stopped", "running", "unknown"})
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


def failure_note(a: Attempt, following: Attempt | None) -> str:
    """`OOM at 812 → micro-batch 8→4`, `NaN loss at 512 → rolled back to 500, lr ×0.5`."""
    text = f"{KIND.get(a.outcome, a.outcome.replace('_', ' '))} at {a.end_step}"
    changes = []
    for key, pair in (a.settings_changed or {}).items():
        if key == "lr_scale" or not isinstance(pair, list) or len(pair) != 2:
            continue
        if key == "grad_checkpoint":
            changes.append("gradient checkpointing " + ("on" if pair[1] else "off"))
        elif key in SETTING_NAMES:
            changes.append(f"{SETTING_NAMES[key]} {pair[0]}→{pair[1]}")
    if a.action == "rollback" and following is not None:
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
                                     and a.action not in (None, "give_up", "stop")):
            out.append((a, following))
    return out


def _restart_text(facts: RunFacts) -> str:
    pairs = restarts(facts.attempts)
    if not pairs:
        return "no restarts"
    by_hand = "" if facts.supervised else " by hand"
    n = len(pairs)
    head = f"{n} restart{'s' if n != 1 else ''}{by_hand}"
    if n <= MAX_LISTED:
        return f"{head} ({'; '.join(failure_note(a, f) for a, f in pairs)})"
    kinds = Counter(KIND.get(a.outcome, a.outcome) for a, _ in pairs)
    return f"{head} ({', '.join(f'{k} ×{c}' for k, c in kinds.most_common())})"


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
    if state == "finished":
        head = f"finished {steps} steps in {wall}"
    elif state == "early_stopped":
        validated = bool(facts.evals) or facts.best is not None  # light facts: no logs read
        watched = "validation loss" if validated else "smoothed training loss"
        head = f"early-stopped at step {steps} after {wall} ({watched} stopped improving)"
    elif state == "gave_up":
        head = f"GAVE UP at step {steps} after {wall}: {facts.reason or '?'}"
    elif state == "stopped":
        head = f"stopped at step {steps} after {wall} ({facts.reason or 'stop requested'})"
    elif state == "incomplete":
        why = KIND.get(last.outcome, last.outcome) if last else "nothing ran"
        head = (f"INCOMPLETE at step {steps} after {wall}: the last worker ended ({why}) and "
                "nothing restarted it")
    elif state == "backing_off":
        head = f"restarting at step {steps}, running for {wall}"
    elif facts.running:
        pct = f" ({100 * facts.final_step / facts.total_steps:.0f}%)" if facts.total_steps else ""
        head = f"training: step {steps}{pct}, running for {wall}"
    else:
        head = f"{state} at step {steps} after {wall}"
    if not facts.supervised and state in ("finished", "early_stopped", "incomplete"):
        head += " (overnight train, no supervisor)"
    parts = [head, _restart_text(facts)]
    best = _best_text(facts)
    if best:
        parts.append(best)
    if facts.test is not None:
        parts.append(f"test loss {facts.test[0]:.3f}")
    return "; ".join(parts)


def verdict(record: dict[str, Any] | None, run_dir: Path) -> str:
    """One line: how the run went (see the module docstring).

    A live status reply (no "attempts") is laid over run.json: its state and step are
    newer, the attempts come from the file.
    """
    run_dir = Path(run_dir)
    if record is not None and not isinstance(record.get("attempts"), list):
        stored = record_mod.load(run_dir / "run.json") or {}
        live = {k: record[k] for k in ("state", "reason", "total_steps") if record.get(k)}
        if isinstance(record.get("step"), int):
            live["final_step"] = record["step"]
        record = {**stored, **live} if stored else record
    return describe(gather(run_dir, record=record, light=True))


def progress_line(run_dir: Path, status: dict[str, Any] | None = None) -> str | None:
    """The worker's progress line for the newest steps in logs/metrics.jsonl (see above)."""
    from worker.progress import Progress  # plain Python: no MLX import

    run_dir = Path(run_dir)
    tail = [m for m in tail_jsonl(run_dir / "logs" / "metrics.jsonl") if "step" in m]
    if not tail:
        return None
    attempt = tail[-1].get("attempt")
    tail = [m for m in tail if m.get("attempt") == attempt]
    status = status or {}
    total = status.get("total_steps")
    if not isinstance(total, int) or total <= 0:
        total = int(tail[-1]["step"])
    prog = Progress(total_steps=total)
    for m in tail:
        prog.record_step(int(m["step"]), float(m.get("loss", math.nan)), float(m.get("lr", 0.0)),
                         int(m.get("tokens", 0)), float(m.get("step_seconds", 0.0)),
                         float(m.get("active_mb", 0.0)))
    events = tail_jsonl(run_dir / "logs" / "worker.jsonl", 256_000)
    evals = [e for e in events if e.get("event") == "evaluated"]
    if evals:
        prog.val, prog.best_val = evals[-1].get("val_loss"), evals[-1].get("best_val_loss")
    else:
        best = status.get("best_checkpoint")
        if isinstance(best, dict) and isinstance(best.get("val_loss"), (int, float)):
            prog.best_val = float(best["val_loss"])
    saved = [e.get("step") for e in events if e.get("event") == "checkpoint_saved"]
    latest = status.get("latest_checkpoint")
    if isinstance(latest, dict) and isinstance(latest.get("step"), int):
        saved.append(latest["step"])
    prog.last_checkpoint_step = max((s for s in saved if isinstance(s, int)), default=0)
    return prog.line()
