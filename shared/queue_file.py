"""The job queue on disk: QUEUE_DIR/queue.json, one typed record, changed only under a lock.

    queue/
      queue.json       this file's record (version 1): the jobs in order, paused, the night
      queue.lock       flock held for one read-modify-write of queue.json (a few ms)
      runner.lock      flock held by the one `overnight run --queue` (shared/runlock.py)
      queue.yaml       the user's settings: on_failure, until, notify (supervisor/queue/settings.py)
      jobs/<name>.yaml each job's config: its YAML with the job's --set values applied
      runs/<name>/     each job's run directory (a normal supervised run)
      logs/            the runner's log (queue.jsonl) and each job supervisor's console output

Every change — `overnight queue add/remove/move/pause/resume` from a terminal, and the
runner marking a job started or ended — is `update(dir, change)`: take queue.lock (an
exclusive flock, waited for at most LOCK_WAIT seconds), read queue.json, apply the change,
write it back atomically (shared/fsutil.atomic_write_json: temp file, fsync, rename). Two
writers never interleave and a reader never sees half a file, so adding a job while the
night runs is safe. The record is decoded by shared/records.py like run.json: a queue.json
that is not one is one line naming the field (QueueError, exit 78), never a traceback.

A job's state (`JobState`): `queued` (waits; `note` says why it was passed over tonight),
`running` (a runner has it — after a crash or reboot the next runner resumes it from its
checkpoint), `deadline` (stopped at the night's deadline after a checkpoint; resumed first
the next night), and the ends, which are never run again: `finished`, `early_stopped`,
`gave_up`, `stopped` (stopped by hand with `overnight stop RUN_DIR`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from shared import records, strictjson
from shared.errors import ConfigError
from shared.fsutil import atomic_write_json

VERSION = 1
LOCK_WAIT = 10.0  # seconds to wait for another writer's read-modify-write (it takes ms)
T = TypeVar("T")


class QueueError(ConfigError):
    """queue.json is unreadable, not a queue record, or a queue command cannot be carried
    out (an unknown job, a running job removed); one line, exit 78."""


_RULES = records.Rules(QueueError)


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DEADLINE = "deadline"
    FINISHED = "finished"
    EARLY_STOPPED = "early_stopped"
    GAVE_UP = "gave_up"
    STOPPED = "stopped"

    @property
    def is_done(self) -> bool:
        """A job in this state is never run again."""
        return self not in (JobState.QUEUED, JobState.RUNNING, JobState.DEADLINE)

    @property
    def is_failure(self) -> bool:
        return self is JobState.GAVE_UP


@dataclass(frozen=True)
class Job:
    """One job: `config` is its own YAML (jobs/<name>.yaml, --set values applied), `source`
    the YAML it was made from, `settings` the --set / --sweep values as typed ("key=value"),
    `cwd` where `queue add` ran (relative paths in the config are resolved from there, as
    `overnight run` would), `run_dir` its run directory. Times are ISO 8601 UTC ("" = not
    yet); `supervisor_starts` counts the job supervisors started for it."""

    name: str
    config: str
    source: str
    cwd: str
    run_dir: str
    settings: list[str] = field(default_factory=list)
    state: JobState = JobState.QUEUED
    reason: str = ""
    note: str = ""
    added: str = ""
    started: str = ""
    ended: str = ""
    supervisor_starts: int = 0


@dataclass(frozen=True)
class Night:
    """The runner's night: when it started, its deadline (ISO UTC, "" = none), its PID.
    Left open by a runner that died, so the next one keeps the same deadline."""

    started: str
    until: str = ""
    pid: int = 0


@dataclass(frozen=True)
class Queue:
    version: int = VERSION
    jobs: list[Job] = field(default_factory=list)
    paused: bool = False
    night: Night | None = None

    def find(self, name: str) -> Job:
        """The job named `name` (or numbered, 1-based, as `overnight queue` lists them)."""
        for job in self.jobs:
            if job.name == name:
                return job
        if name.isdigit() and 1 <= int(name) <= len(self.jobs):
            return self.jobs[int(name) - 1]
        known = ", ".join(j.name for j in self.jobs) or "none"
        raise QueueError(f"no job {name!r} in the queue (jobs: {known})")

    def with_job(self, job: Job) -> Queue:
        """This queue with the job of the same name replaced by `job`."""
        return replace(self, jobs=[job if j.name == job.name else j for j in self.jobs])


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def parse_iso(text: str) -> float | None:
    """Epoch seconds of an ISO 8601 time ("" or unparsable: None)."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def path(queue_dir: Path) -> Path:
    return queue_dir / "queue.json"


def decode(obj: Any, where: str) -> Queue:
    """A Queue from parsed JSON; QueueError naming the field (or an unknown version)."""
    version = obj.get("version") if isinstance(obj, dict) else None
    if version != VERSION:
        raise QueueError(f"{where}: expected version {VERSION}, got {version!r}")
    return records.build(Queue, obj, where, _RULES)


def load(queue_dir: Path) -> Queue:
    """The queue in `queue_dir` (an empty one when there is no queue.json yet); QueueError
    when the file cannot be read or is not a queue."""
    file = path(queue_dir)
    try:
        text = file.read_text()
    except FileNotFoundError:
        return Queue()
    except OSError as e:
        raise QueueError(f"{file}: cannot read ({e.strerror or e})") from None
    try:
        obj = strictjson.loads(text)
    except ValueError as e:
        raise QueueError(f"{file}: not valid JSON ({e})") from None
    return decode(obj, str(file))


@contextlib.contextmanager
def _locked(queue_dir: Path, wait: float) -> Iterator[None]:
    try:
        queue_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(queue_dir / "queue.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise QueueError(f"{queue_dir}: cannot write the queue directory "
                         f"({e.strerror or e})") from None
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise QueueError(f"{queue_dir / 'queue.lock'}: another process has held "
                                     f"the queue for over {wait:g} s; try again") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the flock


def update(queue_dir: Path, change: Callable[[Queue], tuple[Queue, T]],
           wait: float = LOCK_WAIT) -> T:
    """Read, change and write queue.json under queue.lock (module docstring). `change` gets
    the current queue and returns (the new queue, a result for the caller); it may raise
    QueueError, and then nothing is written. QueueError when the file cannot be written."""
    with _locked(queue_dir, wait):
        queue = load(queue_dir)
        new, result = change(queue)
        if new != queue:
            try:
                atomic_write_json(path(queue_dir), records.to_dict(new))
            except OSError as e:
                raise QueueError(f"{path(queue_dir)}: cannot write ({e.strerror or e})"
                                 ) from None
        return result
