"""Reconcile the run record a dead supervisor left behind.

Whatever ends a supervisor — SIGKILL, the OOM killer, a machine restart, its own failure —
its run.json can be left saying "training" with an attempt that never ended. The next
supervisor holds the run lock, so no other supervisor lives: at start (after stopping any
orphaned worker) it closes that attempt as `abandoned`, with the reason it can find:

- the supervisor's end: the machine restarted (the boot id in run.json differs from this
  boot's: shared/run_record.py `supervisor.boot_id`) — then the attempt it interrupted is
  classified `machine_restarted` (its own failure class), with when this boot began and, on
  macOS, the panic string of the newest kernel panic report written after the record's last
  update (Linux: the previous boot's last journal lines, where the journal is persistent;
  supervisor/daemon/machine_restart.py) — or the supervisor logged its own
  failure (`supervisor_failed` in logs/supervisor.jsonl, with the exception), or else
  "supervisor died (no record of how ...)" — SIGKILL and the OOM killer leave none (a
  supervisor on another host, a run directory on a shared file system, is only named);
- the last step the attempt reached (logs/metrics.jsonl, its `worker_stopping`), so its
  end_step and steps_gained are not what run.json said long before;
- the worker's end, when its events say (logs/worker.jsonl: its `worker_stopping` or
  `worker_crashed`, found by its pid), else the last line of its output
  (logs/worker-N.log), or that this supervisor found it still running and stopped it.

The run's state becomes `starting` with that reason, so neither run.json nor
`overnight status` shows a dead run as training.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import strictjson
from shared.exitcodes import FailureClass
from shared.layout import RunDir
from shared.run_record import Action, AttemptRecord, State, SupervisorInfo
from shared.tail import tail_lines
from supervisor.daemon.ending import last_logged_step
from supervisor.daemon.machine_restart import MachineRestart, find_restart
from supervisor.daemon.platform_readings import Platform
from supervisor.daemon.record import RecordKeeper, boot_id

LOG_TAIL_BYTES = 512_000
NO_RECORD = "supervisor died (no record of how: a SIGKILL or the kernel's OOM killer leaves none)"


@dataclass(frozen=True)
class Reconciled:
    """What the record said and what was found."""

    previous_state: State
    attempt: int | None  # the attempt closed as abandoned (None: none was open)
    reason: str
    machine: MachineRestart | None = None  # the machine restarted since the last record


def reconcile(keeper: RecordKeeper, run: RunDir, stopped_orphans: frozenset[int] = frozenset(),
              this_boot: str | None = None, platform: Platform | None = None
              ) -> Reconciled | None:
    """Close what the previous supervisor left open (module docstring); None when it left
    a final state and no open attempt (nothing to reconcile). `platform`: where the boot
    time and panic reports are read (supervisor/daemon/platform_readings.py)."""
    prev, state = keeper.previous, keeper.previous_state
    current = keeper.current
    open_attempt = current if current is not None and current.ended is None else None
    if prev is None or state is None or (state.is_final and open_attempt is None):
        return None
    this_boot = this_boot if this_boot is not None else boot_id()
    machine = None
    if prev.host == socket.gethostname():
        machine = find_restart(prev.boot_id, this_boot, keeper.record.updated,
                               platform or Platform())
    why = machine.text if machine is not None else supervisor_end(prev, run, this_boot)
    if open_attempt is not None:
        events = _events(run.worker_log)
        worker = worker_end(open_attempt, run, stopped_orphans, events)
        reason = f"{why}; attempt {open_attempt.attempt} (worker pid {open_attempt.pid}): {worker}"
        end_step = reached(open_attempt, run, events)
        keeper.end_attempt(
            classification=FailureClass.MACHINE_RESTARTED if machine is not None else None,
            action=Action.ABANDONED, action_reason=reason,
            detail=f"{why}; {worker}" if machine is not None else worker,
            end_step=end_step, steps_gained=max(0, end_step - open_attempt.start_step))
    else:
        reason = f"{why} while {state.value}"
    keeper.set_state(State.STARTING, f"previous supervisor (pid {prev.pid}): {reason}")
    return Reconciled(state, open_attempt.attempt if open_attempt else None, reason, machine)


def supervisor_end(prev: SupervisorInfo, run: RunDir, this_boot: str) -> str:
    """How the previous supervisor ended, as far as anything says."""
    if prev.host != socket.gethostname():  # a run directory on a shared file system
        return f"the supervisor on host {prev.host} is gone (no record of how)"
    if prev.boot_id and this_boot and prev.boot_id != this_boot:
        return (f"the machine restarted (boot id {prev.boot_id[:8]}… is now "
                f"{this_boot[:8]}…) while the supervisor ran")
    for event in reversed(_events(run.supervisor_log)):
        if event.get("pid") == prev.pid and event.get("event") == "supervisor_failed":
            return f"the supervisor failed: {_exception(event)}"
    return NO_RECORD


def worker_end(attempt: AttemptRecord, run: RunDir, stopped: frozenset[int],
               events: list[dict[str, Any]]) -> str:
    """How the open attempt's worker ended, as far as anything says (`events`: the tail of
    logs/worker.jsonl, `_events`)."""
    for event in reversed(events):
        if event.get("pid") != attempt.pid:
            continue
        name = event.get("event")
        if name == "worker_stopping":
            how = f"{event.get('reason', '?')} (exit code {event.get('exit_code', '?')})"
            detail = event.get("detail") or ""
            step = event.get("step")
            at = f" at step {step}" if isinstance(step, int) else ""
            by = "; stopped by this supervisor" if attempt.pid in stopped else ""
            return f"its worker then ended: {how}{at}" + (f": {detail}" if detail else "") + by
        if name == "worker_crashed":
            return f"its worker then crashed: {_exception(event)}"
    if attempt.pid in stopped:
        return "its worker was still running: stopped by this supervisor"
    last = _last_line(run.root / attempt.log) if attempt.log else ""
    return "its worker's end is not recorded" + (f" (last output: {last})" if last else "")


def reached(attempt: AttemptRecord, run: RunDir, events: list[dict[str, Any]]) -> int:
    """The last step the open attempt reached (steps): the highest of what run.json last
    said, the attempt's last line in logs/metrics.jsonl and its worker's `worker_stopping`
    event in `events` (the tail of logs/worker.jsonl) — a supervisor killed mid-attempt
    wrote run.json long before its worker's end."""
    steps = [attempt.end_step, last_logged_step(run.metrics_log, attempt.attempt)]
    for event in events:
        step = event.get("step")
        if (event.get("pid") == attempt.pid and event.get("event") == "worker_stopping"
                and isinstance(step, int) and not isinstance(step, bool)):
            steps.append(step)
    return max(steps)


def _events(path: Path) -> list[dict[str, Any]]:
    """The JSON events in the tail of a log file (cut or torn lines skipped)."""
    out = []
    for raw in tail_lines(path, LOG_TAIL_BYTES):
        try:
            event = strictjson.loads(raw)
        except ValueError:  # torn, cut, or hostile: strictjson never raises anything else
            continue
        if isinstance(event, dict):
            out.append(event)
    return out


def _exception(event: dict[str, Any]) -> str:
    """"ValueError: ..." from structlog's dict_tracebacks, else the event's error field."""
    exc = event.get("exception")
    if isinstance(exc, list) and exc and isinstance(exc[-1], dict):
        return f"{exc[-1].get('exc_type', '?')}: {exc[-1].get('exc_value', '')}"[:300]
    return str(event.get("error") or event.get("detail") or "no details")[:300]


def _last_line(path: Path) -> str:
    lines = [x.strip() for x in tail_lines(path, 4096) if x.strip()]
    return lines[-1].decode("utf-8", "replace")[:300] if lines else ""
