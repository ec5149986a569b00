"""A supervisor that cannot run, under a service manager: stop once, say why, never loop.

A supervisor refuses to start for reasons that do not go away by themselves: a config it
cannot read, a run directory it cannot create, one that another supervisor holds, a hard
open-file limit below what mlx_lm needs. It exits 78 (EX_CONFIG) then. systemd does not
restart that (`RestartPreventExitStatus=78` in our unit), but launchd has no such key: with
`KeepAlive {SuccessfulExit: false}` it relaunches any non-zero exit every ThrottleInterval,
as long as the job is loaded — all night, writing the same line each minute (launchd.plist(5):
"SuccessfulExit: If false, the job will be restarted [unless it exits with status zero]").

So under a service manager — `overnight install` writes SERVICE_ENV into the job's
environment (launchd: EnvironmentVariables; systemd: Environment=) — such a refusal is
recorded and the supervisor exits 0, which both managers treat as final:

- one line on stderr (the service's log): the reason, and that it exits 0 on purpose;
- one `supervisor_refused` event in RUN_DIR/logs/supervisor.jsonl when that directory
  exists (what `overnight logs` and the report read);
- run.json, when there is one, it is not final yet and no other supervisor holds the run:
  state `gave_up` with the reason, so `overnight status` says why the service is not running.

A supervisor that itself fails (exit 1) is still restarted: that may be transient. A run that
reached a final decision already exits 0 (supervisor/daemon/main.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from shared import run_record
from shared.errors import OvernightError, RecordError, RunDirLocked
from shared.fsutil import atomic_write_json
from shared.layout import RunDir
from shared.run_record import State
from shared.runlock import Role, RunLock

SERVICE_ENV = "OVERNIGHT_SERVICE_MANAGER"  # "launchd" or "systemd", set by `overnight install`


def under_service_manager(env: Mapping[str, str] | None = None) -> str:
    """The service manager that started this supervisor ("" when none did)."""
    return (os.environ if env is None else env).get(SERVICE_ENV, "")


def refused(run_dir: Path, error: OvernightError, manager: str) -> int:
    """Record a permanent refusal under `manager` (module docstring); the exit status: 0."""
    reason = (f"refused to start under {manager}: {error}; exiting 0 so that {manager} does "
              "not start it again and again — fix the cause, then start the service again")
    print(f"overnight run: {reason}", file=sys.stderr, flush=True)
    run = RunDir(run_dir)
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
    if run.logs.is_dir():
        event = {"event": "supervisor_refused", "level": "error", "timestamp": now,
                 "pid": os.getpid(), "service_manager": manager, "error": str(error),
                 "detail": reason}
        with contextlib.suppress(OSError), open(run.supervisor_log, "a") as f:
            f.write(json.dumps(event) + "\n")
    if not isinstance(error, RunDirLocked):  # a live supervisor's record is its own
        _record_gave_up(run, reason, now)
    return 0


def _record_gave_up(run: RunDir, reason: str, now: str) -> None:
    if not run.record.is_file():
        return
    lock = RunLock(run.lock, Role.SUPERVISOR)
    try:
        lock.acquire()
    except (OvernightError, OSError):
        return
    try:
        record = run_record.load(run.record)
        if record is None or record.state.is_final:  # a finished run stays finished
            return
        done = dataclasses.replace(record, state=State.GAVE_UP, reason=reason, ended=now,
                                   updated=now, worker=None)
        atomic_write_json(run.record, done.to_dict())
    except (RecordError, OSError):
        return
    finally:
        lock.release()
