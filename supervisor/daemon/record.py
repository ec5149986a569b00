"""The supervisor keeps the run record: it is the only writer of RUN_DIR/run.json.

The record's type and schema are in shared/run_record.py. `RecordKeeper` holds the current
`RunRecord` (frozen: every change makes a new one) and writes it whole, atomically (temp
file, fsync, rename), after every change; a reader never sees a torn file. `totals` are
derived on each write.

**A write that fails** (a full disk, a file system gone read-only) does not end the
supervisor: the record stays in memory — it is the truth, the file is a copy — the failure
is said once on stderr (and logged), and the write is tried again with a backoff (1 s,
doubling to 60 s) on the next change and whenever the loop calls `retry()`; the first write
that succeeds says so. No temp file is left behind (shared/fsutil.py). `flush()` at exit
tries once more whatever the backoff; `unsaved` says whether the file is behind.

**The previous supervisor.** `open()` keeps what the record said about the supervisor
before this one (`previous`, `previous_state`): the next one reconciles a record that a
killed supervisor left "training" (supervisor/daemon/reconcile.py). Each supervisor records
the machine's boot id (`boot_id()`), so a machine restart is told apart from a killed
supervisor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from shared import logsetup, run_record
from shared.errors import RecordError
from shared.exitcodes import FailureClass
from shared.fsutil import atomic_write_json, describe_space
from shared.run_record import (
    FINAL_STATES,
    AttemptRecord,
    Quarantined,
    RunRecord,
    State,
    SupervisorInfo,
    Totals,
    WorkerInfo,
)

RETRY_FIRST = 1.0  # seconds before the first retry of a failed write
RETRY_MAX = 60.0  # the longest wait between retries
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")  # Linux: random, new at every boot


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def boot_id() -> str:
    """This boot of the machine: Linux's boot_id, elsewhere the boot time (psutil)."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return f"boot-time-{round(psutil.boot_time())}"


class RecordKeeper:
    """The run record of one run, kept in memory and saved whole on every change."""

    def __init__(self, path: Path, record: RunRecord,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.record = record
        self.clock = clock
        self.unsaved = False  # the file is behind the record in memory
        self.failed_writes = 0  # consecutive failed writes
        self.retry_at = 0.0  # clock time of the next try after a failure
        self.previous: SupervisorInfo | None = None  # the supervisor before this one
        self.previous_state: State | None = None  # the state it left

    @classmethod
    def open(
        cls, path: Path, run_id: str, run_dir: Path, config_path: Path,
        config: dict[str, Any], config_hash: str,
    ) -> tuple[RecordKeeper, str]:
        """Continue the existing record (a restarted supervisor) or start one; returns the
        keeper and a note when an unreadable run.json was moved aside ("" otherwise).

        RecordError when run.json has a schema version this code does not know (a newer
        mlx-overnight wrote it): it is left alone rather than overwritten.
        """
        note = ""
        try:
            old = run_record.load(path)
        except RecordError as e:
            if "schema_version" in str(e):
                raise
            aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
            os.replace(path, aside)
            old, note = None, f"{e}; moved aside to {aside.name}, starting a new record"
        starts = old.supervisor.starts + 1 if old is not None else 1
        me = SupervisorInfo(pid=os.getpid(), host=socket.gethostname(), started=now_iso(),
                            starts=starts, boot_id=boot_id())
        previous = (old.supervisor, old.state) if old is not None else (None, None)
        if old is None:
            old = RunRecord(run_id=run_id, run_dir="", config_path="", config={},
                            config_hash="", created=now_iso(), state=State.STARTING,
                            supervisor=me)
        record = dataclasses.replace(
            old, run_dir=str(run_dir), config_path=str(config_path), config=config,
            config_hash=config_hash, supervisor=me, ended=None,
        )
        keeper = cls(path, record)
        keeper.previous, keeper.previous_state = previous
        return keeper, note

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def attempts(self) -> tuple[AttemptRecord, ...]:
        return self.record.attempts

    @property
    def current(self) -> AttemptRecord | None:
        return self.record.current

    def save(self) -> bool:
        """Write the record (after a failed write: only once the retry is due); whether the
        file is now up to date. Never raises for a write that fails (module docstring)."""
        r = self.record
        self.record = dataclasses.replace(r, updated=now_iso(), totals=totals(r))
        self.unsaved = True
        return self.retry()

    def retry(self) -> bool:
        """Write the record if it is behind and no backoff is pending; whether it is saved."""
        if self.unsaved and (self.failed_writes == 0 or self.clock() >= self.retry_at):
            self._write()
        return not self.unsaved

    def flush(self) -> bool:
        """Write now, whatever the backoff (the supervisor is about to exit)."""
        if self.unsaved:
            self._write()
        return not self.unsaved

    def _write(self) -> None:
        try:
            atomic_write_json(self.path, self.record.to_dict())
        except OSError as e:
            self.failed_writes += 1
            delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (self.failed_writes - 1))
            self.retry_at = self.clock() + delay
            if self.failed_writes == 1:
                why = f"{e.strerror or e}; {describe_space(self.path.parent)}"
                _stderr(f"overnight run: cannot write {self.path} ({why}): the record is kept "
                        "in memory and written again when it can be (retrying every 1-60 s)")
                logsetup.get("supervisor").warning(
                    "record_write_failed", path=str(self.path), error=why, retry_in_s=delay)
            return
        if self.failed_writes:
            _stderr(f"overnight run: {self.path} written again after {self.failed_writes} "
                    "failed attempts")
            logsetup.get("supervisor").info("record_write_recovered", path=str(self.path),
                                            failed_writes=self.failed_writes)
        self.failed_writes = 0
        self.unsaved = False

    def update(self, save: bool = True, **fields: Any) -> None:
        """Change top-level fields (RunRecord's names), then save unless told not to."""
        self.record = dataclasses.replace(self.record, **fields)
        if save:
            self.save()

    def update_current(self, save: bool = True, **fields: Any) -> None:
        """Change fields of the attempt that runs (AttemptRecord's names)."""
        current = self.current
        assert current is not None, "no attempt to update"
        attempts = (*self.attempts[:-1], dataclasses.replace(current, **fields))
        self.update(save, attempts=attempts)

    def set_state(self, state: State, reason: str = "") -> None:
        ended = now_iso() if state in FINAL_STATES else self.record.ended
        self.update(state=state, reason=reason, ended=ended)

    def begin_attempt(self, entry: AttemptRecord, worker: WorkerInfo) -> None:
        self.update(attempts=(*self.attempts, entry), worker=worker)

    def end_attempt(self, **fields: Any) -> None:
        """The attempt ended: its end fields (AttemptRecord's names), and no worker runs."""
        current = self.current
        assert current is not None, "no attempt to end"
        ended = dataclasses.replace(current, ended=now_iso(), **fields)
        self.update(attempts=(*self.attempts[:-1], ended), worker=None)

    def note_quarantine(self, name: str, path: Path, reason: str) -> None:
        entry = Quarantined(checkpoint=name, path=str(path), reason=reason, time=now_iso())
        self.update(quarantined=(*self.record.quarantined, entry))


def totals(r: RunRecord) -> Totals:
    ended = [a for a in r.attempts if a.classification is not None]
    return Totals(
        attempts=len(r.attempts),
        failures=sum(1 for a in ended if a.classification is not None
                     and a.classification.is_failure),
        planned_restarts=sum(1 for a in ended
                             if a.classification is FailureClass.PLANNED_RESTART),
        rollbacks=r.rollbacks,
        restarts=max(0, len(r.attempts) - 1),
        steps_trained=sum(max(0, a.steps_gained) for a in r.attempts),
        tokens=sum(a.tokens for a in r.attempts),
        train_seconds=round(sum(_duration(a) for a in r.attempts), 3),
        downtime_seconds=round(sum(a.downtime_s or 0.0 for a in r.attempts), 3),
    )


def _duration(a: AttemptRecord) -> float:
    try:
        start = dt.datetime.fromisoformat(a.started)
        end = dt.datetime.fromisoformat(a.ended) if a.ended else None
    except ValueError:
        return 0.0
    return (end - start).total_seconds() if end else 0.0


def _stderr(line: str) -> None:
    """One line on stderr, which may itself be unwritable (then it is lost, not fatal)."""
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)
