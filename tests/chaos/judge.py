"""After a run: what the supervisor made of each fault (run.json, the logs), whether the run
recovered, whether a damaged checkpoint was resumed from, and max |Δ| of the final adapters
against the uninterrupted reference.

- **classified right**: the attempt the fault hit carries the kind's expected class
  (tests/chaos/kinds.py), or what must hold instead: a damaged checkpoint is in run.json's
  `quarantined` list; a stop signal ends the supervisor with exit 0, state "stopped", the
  attempt "graceful_stop" and no worker left; socket garbage leaves the supervisor alive and
  answering `status`; a start race refuses exactly one supervisor (exit 78, "in use") and
  never runs two workers; a stopped worker is gone within 5 s of its supervisor's death.
- **corrupt accepted**: a worker logged `resumed` from the damaged directory after the damage
  and before a new checkpoint of that step was written there.
- **recovered**: the run finished (every step, COMPLETE) and the fault was not what killed a
  supervisor or made it give up (`blamed`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.chaos.kinds import CORRUPT_PREFIX, KINDS, SIGNALS, SUPERVISOR_DEATHS
from tests.chaos.observe import epoch, read_jsonl
from tests.chaos.results import FaultResult, RunResult
from tests.chaos.tensorfile import max_abs_diff

if TYPE_CHECKING:
    from tests.chaos.driver import Driver

ORPHAN_LIMIT_S = 5.0


def culprit(d: Driver, rec: dict[str, Any]) -> FaultResult | None:
    """The fault behind an unexpected end: the one that hit the attempt the supervisor gave
    up after, else the last one fired."""
    attempts = rec.get("attempts") or []
    if rec.get("state") == "gave_up" and attempts:
        pid = attempts[-1].get("pid")
        for r in reversed(d.results):
            if r.fired and r.worker_pid == pid:
                return r
        started = epoch(attempts[-1].get("started")) or 0.0
        for r in reversed(d.results):  # a damaged checkpoint the last attempt resumed from
            if r.fired and r.kind.startswith(CORRUPT_PREFIX) and (r.t_fired or 0) <= started:
                return r
    return d.last_fired


def judge_run(d: Driver, seconds: float) -> RunResult:
    rec = d.obs.record() or {}
    run_dir = d.run_dir
    worker_events = read_jsonl(run_dir / "logs" / "worker.jsonl")
    sup_events = read_jsonl(run_dir / "logs" / "supervisor.jsonl")
    metrics = read_jsonl(run_dir / "logs" / "metrics.jsonl")
    total = rec.get("total_steps")
    adapters = run_dir / "adapters" / "adapters.safetensors"
    finished = (rec.get("state") == "finished" and rec.get("final_step") == total
                and (run_dir / "COMPLETE").exists() and adapters.exists())
    delta = max_abs_diff(adapters, d.s.reference) if adapters.exists() else None
    result = RunResult(
        index=d.plan.index, plan=d.plan.to_dict(), run_dir=str(run_dir), seconds=round(seconds, 2),
        state=rec.get("state"), final_step=rec.get("final_step"),
        high_water_step=rec.get("high_water_step"), total_steps=total, finished=finished,
        delta=delta, attempts=len(rec.get("attempts") or []),
        supervisors_started=len(d.started), rescues=d.rescues, unexpected=list(d.unexpected),
        faults=d.results,
    )
    if total is not None and (rec.get("high_water_step") or 0) > total:
        result.unexpected.append(f"high_water_step {rec.get('high_water_step')} > total "
                                 f"steps {total}")
    for r in d.results:
        r.expected = KINDS[r.kind].expect
        if not r.fired:
            continue
        _classify(r, rec, worker_events, sup_events)
        r.recovered = finished and not r.blamed
        r.delta = delta if finished else None
        r.delta_required = d.plan.exact
        r.recovery_s = _recovery(r, metrics)
        if r.kind.startswith(CORRUPT_PREFIX):
            r.corrupt_accepted = _accepted(r, worker_events)
        if r.kind == "socket_telemetry" and "forged" in r.variant:
            hw = rec.get("high_water_step") or 0
            if total is not None and hw > total:
                r.classified_ok = False
                r.observed += f"; forged step accepted: high_water_step {hw}"
    return result


def _attempt(r: FaultResult, rec: dict[str, Any]) -> dict[str, Any] | None:
    for a in rec.get("attempts") or []:
        if r.worker_pid is not None and a.get("pid") == r.worker_pid:
            r.attempt = a.get("attempt")
            return dict(a)
    return None


def _classify(r: FaultResult, rec: dict[str, Any], worker_events: list[dict[str, Any]],
              sup_events: list[dict[str, Any]]) -> None:
    kind = r.kind
    a = _attempt(r, rec)
    got = (a.get("classification") or a.get("action") or "unrecorded") if a else "no attempt"
    if a and a.get("action") == "abandoned":
        got = "abandoned"
    if kind in SIGNALS:
        f = r.facts
        r.observed = (f"attempt {got}; supervisor exit {f.get('exit')}, state "
                      f"{f.get('state_after')}, {f.get('workers_left')} worker(s) left")
        r.classified_ok = (got == "graceful_stop" and f.get("exit") == 0
                           and f.get("state_after") == "stopped" and f.get("workers_left") == 0)
    elif kind in SUPERVISOR_DEATHS:
        r.observed = f"attempt {got}"
        r.classified_ok = got == "abandoned"
        if kind == "orphan_stopped":
            gone = r.facts.get("orphan_gone_s")
            r.observed += (f"; stopped worker gone {gone} s after its supervisor"
                           if gone is not None else
                           f"; stopped worker still alive {ORPHAN_LIMIT_S:.0f} s after its "
                           "supervisor died")
            r.classified_ok = r.classified_ok and gone is not None
    elif kind.startswith(CORRUPT_PREFIX):
        _classify_corrupt(r, rec, worker_events, sup_events)
    elif kind in ("socket_control", "socket_telemetry"):
        f = r.facts
        if not f.get("alive") and f.get("exit") == 0 and f.get("state_after") == "finished":
            r.observed = "the run finished meanwhile (exit 0)"
            r.classified_ok = True
        else:
            r.observed = ("alive" if f.get("alive") else
                          f"DEAD (exit {f.get('exit')}, run {f.get('state_after')})") + (
                ", status answered" if f.get("status_ok") else ", status NOT answered") + (
                " (at the second request)" if f.get("status_retry") else "")
            r.classified_ok = bool(f.get("alive") and f.get("status_ok"))
    elif kind == "start_race":
        f = r.facts
        out = str(f.get("refused_output") or "")
        r.observed = (f"refused exit {f.get('refused_exit')} ({out[:160]}); at most "
                      f"{f.get('max_workers')} worker(s) at once")
        if f.get("both"):
            r.observed += f"; both supervisors {f['both']}"
        winner_ok = True
        if "winner_exit" in f:
            r.observed += (f"; the other exited {f['winner_exit']} with the run "
                           f"{f.get('state_after')}")
            winner_ok = f["winner_exit"] == 0 and f.get("state_after") == "finished"
        r.classified_ok = (f.get("refused_exit") == 78 and "in use" in out
                           and (f.get("max_workers") or 0) <= 1 and winner_ok)
    else:
        r.observed = got
        if a and a.get("detail"):
            r.observed += f" ({str(a['detail'])[:160]})"
        r.classified_ok = got == KINDS[kind].expect


def _classify_corrupt(r: FaultResult, rec: dict[str, Any],
                      worker_events: list[dict[str, Any]],
                      sup_events: list[dict[str, Any]]) -> None:
    path = r.facts.get("corrupted")
    if not path:
        r.observed = "nothing damaged (no checkpoint yet)"
        r.classified_ok = None
        return
    name = Path(path).name
    t = r.t_fired or 0.0
    hits = [q for q in rec.get("quarantined") or []
            if q.get("checkpoint") == name and (epoch(q.get("time")) or 0) >= t - 1.0]
    starts = [epoch(e.get("timestamp")) or 0.0 for e in sup_events
              if e.get("event") == "checkpoint_validation_started"]
    t_kill = float(r.facts.get("t_kill") or t)
    first = min((s for s in starts if s >= t_kill), default=None)
    if first is not None and first < t:
        r.notes.append("race lost: the supervisor began validating before the damage was "
                       "done (the worker trusts that validation)")
    validated = [e for e in worker_events if e.get("event") == "checkpoint_validated"
                 and _same(e.get("path"), path) and (epoch(e.get("timestamp")) or 0) >= t]
    if validated:
        r.facts["worker_validated_it"] = True
    if hits:
        r.observed = f"quarantined: {str(hits[0].get('reason'))[:160]}"
        r.classified_ok = True
    else:
        r.observed = "NOT quarantined"
        r.classified_ok = False


def _accepted(r: FaultResult, worker_events: list[dict[str, Any]]) -> bool | None:
    """A worker resumed from the damaged directory before it was written anew."""
    path = r.facts.get("corrupted")
    if not path:
        return None
    t = r.t_fired or 0.0
    for e in worker_events:
        if (epoch(e.get("timestamp")) or 0.0) < t:
            continue
        if e.get("event") == "checkpoint_saved" and _same(e.get("path"), path):
            return False
        if e.get("event") == "resumed" and _same(e.get("checkpoint"), path):
            return True
    return False


def _same(a: object, b: str) -> bool:
    return isinstance(a, str) and os.path.realpath(a) == os.path.realpath(b)


def _recovery(r: FaultResult, metrics: list[dict[str, Any]]) -> float | None:
    """Seconds from the fault to the first step of a later attempt."""
    if not KINDS[r.kind].restarts or r.t_fired is None:
        return None
    hit = r.attempt or 0
    for m in metrics:
        if (m.get("attempt") or 0) > hit and (m.get("time") or 0) >= r.t_fired:
            return round(float(m["time"]) - r.t_fired, 3)
    return None

