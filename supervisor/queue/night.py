"""`overnight run --queue DIR [--until 07:00]`: the night's jobs, one at a time.

    overnight queue add configs/a.yaml --sweep learning_rate=1e-5,1e-4
    overnight run --queue queue --until 07:00        # or: overnight install --queue queue

Each job is a normal supervised run: the runner starts `overnight run JOB.yaml --run-dir
QUEUE/runs/NAME` (supervisor/daemon/main.py, unchanged) as a child process in the job's
working directory, waits for it, and reads how it ended from its run.json. Nothing of the
supervisor is repeated here: restarts, checkpoints, resume, the record are the job
supervisor's; this module only sequences.

**Nothing interrupts the queue.**
- A job that gives up is recorded `gave_up` and the next one starts (`on_failure: stop` in
  queue.yaml, or `--on-failure stop`, ends the night there instead).
- The runner dies (SIGKILL, a crash, a reboot): the job supervisor's orphan guard
  (supervisor/daemon/orphan_guard.py, the one every worker has) sees the runner's pipe close
  and sends the job supervisor SIGTERM, so it checkpoints and stops. The job stays `running`
  in queue.json; the next runner (the service manager restarts it, or you do) waits for the
  old job supervisor to let go of the run directory, then starts the job again, and its
  supervisor resumes from the checkpoint (exact resume: the same result as an uninterrupted
  run). A finished job is never started again: its state in queue.json is final.
- The job's supervisor itself fails (exit 1 or a signal): it is started again, at most
  3 times in a row, 2 s apart, then the job gives up (supervisor/queue/job.py runs one job).
- SIGTERM/SIGINT/SIGHUP to the runner (a service stop, Ctrl-C): passed on to the job's
  supervisor (checkpoint, stop); the job stays `running` and resumes at the next start.

**The deadline** (`--until` or `until:` in queue.yaml; supervisor/queue/settings.py): at the
deadline the running job's supervisor is asked to stop (SIGTERM: the worker saves a
checkpoint, exit 23); the job ends `deadline` — not a failure; its best checkpoint is its
result so far, and the next night resumes it first. Jobs not started stay `queued`. Before a
job starts, its expected duration (supervisor/queue/estimate.py: measured speed tonight) is
compared with the time left; a job that cannot finish is passed over for tonight, stays
queued with a note saying so, and the next one is tried. A runner that dies keeps its
night's deadline (queue.json `night`); one started after that deadline (within an hour)
ends at once, one started later begins a new night.

**Paused** (`overnight queue pause`): no job is started; a job interrupted by a crash still
resumes. The runner waits for `overnight queue resume`, the deadline or a signal.

Exit status as `overnight run`: 0 for any end of the night (done, deadline, stopped, a
failure with on_failure stop), 78 for an unusable queue or settings, or a queue another
runner holds; 1 only if the runner itself failed. Notifications: supervisor/queue/notify.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from shared import config as config_mod
from shared import logsetup, queue_file
from shared.errors import ConfigError, OvernightError, RunDirLocked
from shared.queue_file import Job, JobState, Night, Queue, QueueError, now_iso
from shared.runlock import Role, RunLock
from supervisor.daemon import sdnotify
from supervisor.queue import estimate
from supervisor.queue import settings as settings_mod
from supervisor.queue.job import POLL, JobRunner, clock, facts_of
from supervisor.queue.notify import Message, Notifier

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# A night left open (its runner died or was stopped) is continued — with its deadline — by
# a runner started before its deadline or within this many seconds after it (a restart by
# the service manager, a reboot: the night has ended, start nothing); later (the next
# evening) a new night begins.
NIGHT_OVER_AFTER = 3600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The queue's options of `overnight run` (supervisor/daemon/main.py adds them)."""
    parser.add_argument("--queue", type=Path, metavar="DIR",
                        help="run the jobs of the queue in DIR one at a time (see overnight "
                             "queue); CONFIG is then not given")
    parser.add_argument("--until", metavar="HH:MM",
                        help="with --queue: the night's deadline (local time; or an ISO date "
                             "and time); the running job checkpoints and stops then")
    parser.add_argument("--on-failure", choices=("continue", "stop"),
                        help="with --queue: after a job gives up, go on (default) or stop")
    parser.add_argument("--no-skip", action="store_true",
                        help="with --queue --until: start a job even when its measured speed "
                             "cannot finish it before the deadline")


def queue_of(args: argparse.Namespace) -> Path | None:
    """The queue directory `overnight run` was given (--queue DIR, or as CONFIG a directory
    holding queue.json: what `overnight install --queue` writes), or None for a single run;
    ConfigError for options that do not go together."""
    queue, config = getattr(args, "queue", None), args.config
    if queue is not None and config is not None:
        raise ConfigError("expected CONFIG.yaml or --queue DIR, not both")
    if queue is None and config is not None and Path(config).is_dir() and (
            Path(config) / "queue.json").exists():
        queue = config
        if args.run_dir is not None and Path(args.run_dir).resolve() != Path(queue).resolve():
            raise ConfigError(f"{config}: a queue directory: its jobs have their own run "
                              "directories (no --run-dir)")
    if queue is None:
        if config is None:
            raise ConfigError("expected CONFIG.yaml (one run) or --queue DIR (a night of jobs)")
        for flag, value in (("--until", getattr(args, "until", None)),
                            ("--on-failure", getattr(args, "on_failure", None)),
                            ("--no-skip", getattr(args, "no_skip", False))):
            if value:
                raise ConfigError(f"{flag}: only with --queue DIR")
        return None
    if args.run_dir is not None and Path(args.run_dir).resolve() != Path(queue).resolve():
        raise ConfigError("--run-dir: not with --queue (each job has its own run directory "
                          "under DIR/runs/)")
    return Path(queue)


def main(args: argparse.Namespace, queue_dir: Path) -> int:
    queue_dir = queue_dir.resolve()
    if not queue_file.path(queue_dir).exists():
        raise QueueError(f"{queue_dir}: no queue here (add a job first: `overnight queue add "
                         f"CONFIG.yaml --queue {queue_dir}`)")
    settings = settings_mod.load(queue_dir)
    queue_file.load(queue_dir)  # an unreadable queue.json: one line now
    until_text = args.until or settings.until
    if until_text:
        now = datetime.now()
        what = "--until" if args.until else f"{queue_dir / 'queue.yaml'}: until"
        if settings_mod.deadline(until_text, now, what) <= now:  # ConfigError: one line
            raise ConfigError(
                f"{what}: {until_text} is in the past; nothing would run (give a later date "
                "and time, or a clock time HH:MM: the next one)")
    (queue_dir / "logs").mkdir(parents=True, exist_ok=True)
    lock = RunLock(queue_dir / "runner.lock", Role.SUPERVISOR)
    try:
        lock.acquire()
    except RunDirLocked as e:
        who = f"PID {e.holder.pid}" if e.holder is not None else "another process"
        raise QueueError(f"{queue_dir}: the queue is already being run by {who} (stop it "
                         "first; `overnight queue` shows its jobs)") from None
    try:
        logsetup.configure("queue", queue_dir / "logs" / "queue.jsonl", console=True,
                           level=getattr(args, "log_level", "info"))
        log = logsetup.get("queue")
        notifier = Notifier(settings.notify, log)
        runner = Runner(queue_dir, until_text, args.on_failure or settings.on_failure,
                        settings.skip_unfinishable and not args.no_skip, log, notifier)
        try:
            with _Signals(runner):
                runner.run()
        except BaseException:
            log.exception("queue_runner_failed")
            runner.stop_child()
            raise
        finally:
            notifier.close()
    finally:
        lock.release()
    return 0


class _Signals:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.saved: dict[int, Any] = {}

    def _on(self, signum: int, frame: FrameType | None) -> None:
        self.runner.signalled = signum

    def __enter__(self) -> _Signals:
        for sig in SIGNALS:
            self.saved[sig] = signal.signal(sig, self._on)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


class Runner(JobRunner):
    """One night of a queue (module docstring); one job at a time: supervisor/queue/job.py."""

    def __init__(self, queue_dir: Path, until_text: str, on_failure: str, skip: bool,
                 log: Any, notifier: Notifier) -> None:
        super().__init__(queue_dir, until_text, log, notifier)
        self.on_failure = on_failure
        self.skip = skip
        self.skipped: set[str] = set()

    # ---- the night -----------------------------------------------------------------------

    def run(self) -> str:
        self._open_night()
        sdnotify.ready()
        how = self._jobs()
        self._close_night(how)
        return how

    def _open_night(self) -> None:
        def change(q: Queue) -> tuple[Queue, tuple[Night, bool]]:
            old = q.night
            old_until = queue_file.parse_iso(old.until) if old is not None else None
            if old is not None and (old_until is None
                                    or time.time() < old_until + NIGHT_OVER_AFTER):
                # a runner died or was stopped tonight: its night (and deadline) goes on
                night, continued = replace(old, pid=os.getpid()), True
            else:
                at = (settings_mod.deadline(self.until_text, datetime.now())
                      if self.until_text else None)
                night = Night(started=now_iso(), pid=os.getpid(),
                              until=at.astimezone().isoformat(timespec="seconds") if at else "")
                continued = False
            return replace(q, night=night), (night, continued)

        night, continued = queue_file.update(self.dir, change)
        self.until = queue_file.parse_iso(night.until)
        q = queue_file.load(self.dir)
        self.log.info("queue_started", queue=str(self.dir), jobs=len(q.jobs),
                      until=night.until or None, continued_night=continued,
                      on_failure=self.on_failure, paused=q.paused)
        self._say(f"{len(q.jobs)} jobs" + (f", until {clock(self.until)}" if self.until else "")
                  + (" (continuing the night of a runner that died)" if continued else ""))

    def _close_night(self, how: str) -> None:
        q = queue_file.load(self.dir)
        counts: dict[str, int] = {}
        for job in q.jobs:
            counts[job.state.value] = counts.get(job.state.value, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no jobs"
        self.log.info("queue_ended", how=how, jobs=counts)
        self._say(f"night ended ({how}): {summary}")
        if how != "stopped":  # a stopped runner's night goes on when it is started again
            queue_file.update(self.dir, lambda q: (replace(q, night=None), None))
        self.notifier.send(Message("queue", f"queue {self.dir.name} ended ({how})", summary,
                                   {"queue": str(self.dir), "how": how, "jobs": counts}))

    def _jobs(self) -> str:
        while True:
            if self.signalled is not None:
                return "stopped"
            if self._past_deadline():
                return "deadline"
            q = queue_file.load(self.dir)
            job = self._pick(q)
            if job is None:
                if q.paused and any(j.state is not JobState.RUNNING and not j.state.is_done
                                    and j.name not in self.skipped for j in q.jobs):
                    self._wait_paused()
                    continue
                return "done"
            if job.state is not JobState.RUNNING and self._cannot_finish(q, job):
                continue
            end = self._run_job(job)
            if end is None:
                return "stopped"
            if end is JobState.DEADLINE:
                return "deadline"
            if end is JobState.GAVE_UP and self.on_failure == "stop":
                return "failure"

    def _pick(self, q: Queue) -> Job | None:
        """An interrupted job first (it resumes even when paused), then, unless paused, one
        stopped at a deadline, then the first queued one, in list order."""
        waiting = [j for j in q.jobs if j.name not in self.skipped]
        for state in (JobState.RUNNING, JobState.DEADLINE, JobState.QUEUED):
            if state is not JobState.RUNNING and q.paused:
                return None
            for job in waiting:
                if job.state is state:
                    return job
        return None

    def _wait_paused(self) -> None:
        self.log.info("queue_paused_waiting")
        self._say("the queue is paused: waiting for `overnight queue resume`")
        while self.signalled is None and not self._past_deadline():
            if not queue_file.load(self.dir).paused:
                self.log.info("queue_resumed")
                return
            self._sleep(POLL * 2)

    def _cannot_finish(self, q: Queue, job: Job) -> bool:
        """Skip `job` for tonight when its measured speed cannot finish it by the deadline."""
        if self.until is None or not self.skip:
            return False
        config = _config_values(job)
        own = estimate.speed_of(Path(job.run_dir), job.name)
        latest = None
        for other in sorted(q.jobs, key=lambda j: j.ended or j.started, reverse=True):
            if other.name != job.name and other.started:
                latest = estimate.speed_of(Path(other.run_dir), other.name)
                if latest is not None:
                    break
        facts = facts_of(job) if own is not None else None
        steps = estimate.remaining_steps(facts, config)
        guess = estimate.estimate(own, latest, config, steps)
        if guess is None:
            return False
        needed, speed = guess
        left = self.until - time.time()
        if needed <= left:
            return False
        note = (f"skipped tonight: {steps} steps need ~{_minutes(needed)} at "
                f"{speed.step_seconds:.3g} s/step (measured on {speed.source}), "
                f"{_minutes(left)} left before {clock(self.until)}")
        self.skipped.add(job.name)
        queue_file.update(self.dir, lambda q: (q.with_job(replace(q.find(job.name), note=note)),
                                               None))
        self.log.warning("job_skipped", job=job.name, needed_s=round(needed, 1),
                         left_s=round(left, 1), step_seconds=speed.step_seconds,
                         measured_on=speed.source)
        self._say(f"{job.name}: {note}")
        return True


def _config_values(job: Job) -> dict[str, Any]:
    try:
        return config_mod.load(Path(job.config)).to_dict()
    except (OvernightError, OSError):
        return {}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
