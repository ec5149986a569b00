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
  SUPERVISOR_RETRIES times in a row, SUPERVISOR_BACKOFF s apart, then the job gives up.
- SIGTERM/SIGINT/SIGHUP to the runner (a service stop, Ctrl-C): passed on to the job's
  supervisor (checkpoint, stop); the job stays `running` and resumes at the next start.

**The deadline** (`--until` or `until:` in queue.yaml; supervisor/queue/settings.py): at the
deadline the running job's supervisor is asked to stop (SIGTERM: the worker saves a
checkpoint, exit 23); the job ends `deadline` — not a failure; its best checkpoint is its
result so far, and the next night resumes it first. Jobs not started stay `queued`. Before a
job starts, its expected duration (supervisor/queue/estimate.py: measured speed tonight) is
compared with the time left; a job that cannot finish is passed over for tonight, stays
queued with a note saying so, and the next one is tried. A runner that dies keeps its
night's deadline (queue.json `night`); one started after that deadline ends at once.

**Paused** (`overnight queue pause`): no job is started; a job interrupted by a crash still
resumes. The runner waits for `overnight queue resume`, the deadline or a signal.

Exit status as `overnight run`: 0 for any end of the night (done, deadline, stopped, a
failure with on_failure stop), 78 for an unusable queue or settings, or a queue another
runner holds; 1 only if the runner itself failed. Notifications: supervisor/queue/notify.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from shared import config as config_mod
from shared import logsetup, queue_file, run_record
from shared.errors import ConfigError, OvernightError, RecordError, RunDirLocked
from shared.layout import RunDir
from shared.queue_file import Job, JobState, Night, Queue, QueueError, now_iso
from shared.runlock import Role, RunLock, is_locked
from shared.runlock import read as read_holder
from shared.tail import tail_lines
from supervisor.daemon import sdnotify, spawn
from supervisor.queue import estimate
from supervisor.queue import settings as settings_mod
from supervisor.queue.notify import Message, Notifier

POLL = 0.5  # seconds between looks at the job supervisor, the clock and the signals
FAILURE_CHECK_EVERY = 2.0  # seconds between reads of the job's run.json for failures
SUPERVISOR_RETRIES = 3
SUPERVISOR_BACKOFF = 2.0
STOP_MARGIN = 60.0  # seconds beyond the job's stop_timeout for its supervisor to stop
SUPERVISOR_RUN = [sys.executable, "-m", "supervisor.cli", "run"]
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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
        for flag, value in (("--until", args.until), ("--on-failure", args.on_failure),
                            ("--no-skip", args.no_skip)):
            if value:
                raise ConfigError(f"{flag}: only with --queue DIR")
        return None
    if args.run_dir is not None and Path(args.run_dir).resolve() != Path(queue).resolve():
        raise ConfigError("--run-dir: not with --queue (each job has its own run directory "
                          "under DIR/runs/)")
    return Path(queue)


def main(args: argparse.Namespace, queue_dir: Path) -> int:
    queue_dir = queue_dir.resolve()
    settings = settings_mod.load(queue_dir)
    queue_file.load(queue_dir)  # an unreadable queue.json: one line now
    until_text = args.until or settings.until
    if until_text:
        settings_mod.deadline(until_text, datetime.now())  # ConfigError: one line
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


class Runner:
    """One night of a queue (module docstring)."""

    def __init__(self, queue_dir: Path, until_text: str, on_failure: str, skip: bool,
                 log: Any, notifier: Notifier) -> None:
        self.dir = queue_dir
        self.until_text = until_text
        self.on_failure = on_failure
        self.skip = skip
        self.log = log
        self.notifier = notifier
        self.until: float | None = None
        self.signalled: int | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self.skipped: set[str] = set()
        self.ended: list[tuple[str, JobState]] = []
        self.next_watchdog = 0.0

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
            if old is not None:  # a runner died: its night (and deadline) goes on
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
        self._say(f"{len(q.jobs)} jobs" + (f", until {_clock(self.until)}" if self.until else "")
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

    def _past_deadline(self) -> bool:
        return self.until is not None and time.time() >= self.until

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
        facts = _facts(job) if own is not None else None
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
                f"{_minutes(left)} left before {_clock(self.until)}")
        self.skipped.add(job.name)
        queue_file.update(self.dir, lambda q: (q.with_job(replace(q.find(job.name), note=note)),
                                               None))
        self.log.warning("job_skipped", job=job.name, needed_s=round(needed, 1),
                         left_s=round(left, 1), step_seconds=speed.step_seconds,
                         measured_on=speed.source)
        self._say(f"{job.name}: {note}")
        return True

    # ---- one job -------------------------------------------------------------------------

    def _run_job(self, job: Job) -> JobState | None:
        """Run `job` to its end; its final JobState, or None when the runner was signalled
        (the job stays `running`)."""
        failures = 0
        while True:
            self._wait_for_old_supervisor(job)
            if self.signalled is not None:
                return None
            job = self._mark_started(job)
            rc, why = self._supervise(job)
            end, reason = self._ending(job, rc, why)
            if end is None and why == "signal":
                self._update(job.name, reason=reason)
                return None
            if end is None:  # the job's supervisor failed: start it again
                failures += 1
                self.log.warning("job_supervisor_failed", job=job.name, exit=rc,
                                 failures=failures, output=str(self._console(job)))
                if failures < SUPERVISOR_RETRIES:
                    self._sleep(SUPERVISOR_BACKOFF)
                    if not self._past_deadline():
                        continue
                    end, reason = JobState.DEADLINE, (f"the deadline {_clock(self.until)} came "
                                                      f"while its supervisor was restarted")
                    self._finish(job, end, reason)
                    return end
                end = JobState.GAVE_UP
                reason = (f"its supervisor failed {failures} times in a row (last exit {rc}; "
                          f"see {self._console(job)})")
            self._finish(job, end, reason)
            return end

    def _mark_started(self, job: Job) -> Job:
        def change(q: Queue) -> tuple[Queue, Job]:
            cur = q.find(job.name)
            new = replace(cur, state=JobState.RUNNING, started=cur.started or now_iso(),
                          supervisor_starts=cur.supervisor_starts + 1, note="", reason="")
            return q.with_job(new), new

        job = queue_file.update(self.dir, change)
        resumed = job.supervisor_starts > 1
        self.log.info("job_started", job=job.name, run_dir=job.run_dir, resumed=resumed,
                      supervisor_start=job.supervisor_starts)
        self._say(f"{job.name}: {'resuming' if resumed else 'starting'} "
                  f"(run dir {job.run_dir})")
        return job

    def _supervise(self, job: Job) -> tuple[int, str]:
        """Start the job's supervisor and wait for it; (exit status, why we stopped it: ""
        / "signal" / "deadline")."""
        out = open(self._console(job), "ab")  # noqa: SIM115 - closed below
        try:
            popen = subprocess.Popen(
                [*SUPERVISOR_RUN, job.config, "--run-dir", job.run_dir], cwd=job.cwd,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=sdnotify.child_environment(), start_new_session=True, close_fds=True)
        except OSError as e:
            out.close()
            self.log.error("job_start_failed", job=job.name, error=str(e))
            return 1, ""
        try:
            guard = spawn.start_guard(popen.pid, _stop_grace(job), out)
        except BaseException:
            popen.kill()
            popen.wait()
            out.close()
            raise
        self.child = popen
        why, failures_seen, next_check = "", _failures(job), 0.0
        try:
            while popen.poll() is None:
                if not why and self.signalled is not None:
                    why = "signal"
                    popen.send_signal(signal.SIGTERM)
                    sdnotify.stopping()
                    self.log.info("job_stop_requested", job=job.name, why=why)
                elif not why and self._past_deadline():
                    why = "deadline"
                    popen.send_signal(signal.SIGTERM)
                    self.log.info("job_stop_requested", job=job.name, why=why,
                                  until=self.until_text)
                    self._say(f"{job.name}: the deadline ({_clock(self.until)}) has come: "
                              "checkpoint and stop")
                if time.monotonic() >= next_check:
                    failures_seen = self._report_failures(job, failures_seen)
                    next_check = time.monotonic() + FAILURE_CHECK_EVERY
                self._sleep(POLL, popen)
        finally:
            guard.release()
            out.close()
            self.child = None
        self._report_failures(job, failures_seen)
        return popen.returncode, why

    def _ending(self, job: Job, rc: int, why: str) -> tuple[JobState | None, str]:
        """How the job ended, from its run.json: (state, reason); (None, reason) when it did
        not end (its supervisor failed, or we stopped it for a signal)."""
        try:
            record = run_record.load(RunDir(Path(job.run_dir)).record)
        except RecordError:
            record = None
        if rc == 0 and record is not None:
            state, reason = record.state, record.reason
            if state is run_record.State.FINISHED:
                return JobState.FINISHED, reason
            if state is run_record.State.EARLY_STOPPED:
                return JobState.EARLY_STOPPED, reason
            if state is run_record.State.GAVE_UP:
                return JobState.GAVE_UP, reason
            if state is run_record.State.STOPPED and why == "deadline":
                return JobState.DEADLINE, (f"stopped at the deadline {_clock(self.until)} at "
                                           f"step {record.final_step}")
            if state is run_record.State.STOPPED and why == "signal":
                return None, f"interrupted at step {record.final_step}: the runner was stopped"
            if state is run_record.State.STOPPED:
                return JobState.STOPPED, f"stopped by hand ({reason})"
        last = _last_line(self._console(job))
        if why == "deadline":  # our SIGTERM came before its supervisor could catch it
            step = record.final_step if record is not None else 0
            return JobState.DEADLINE, (f"stopped at the deadline {_clock(self.until)} at step "
                                       f"{step} (exit {rc})")
        if rc == 78 and "in use" not in last:
            return JobState.GAVE_UP, f"refused to start: {last}"
        if why == "signal":
            return None, "interrupted: the runner was stopped"
        return None, f"its supervisor ended with exit {rc}: {last}"

    def _finish(self, job: Job, end: JobState, reason: str) -> None:
        self._update(job.name, state=end, reason=reason, ended=now_iso())
        verdict = _verdict(job)
        self.ended.append((job.name, end))
        self.log.info("job_ended", job=job.name, state=end.value, reason=reason,
                      verdict=verdict)
        self._say(f"{job.name}: {end.value}: {verdict or reason}")
        self.notifier.send(Message(
            "job", f"{job.name} {end.value}", verdict or reason,
            {"queue": str(self.dir), "job": job.name, "state": end.value, "reason": reason,
             "run_dir": job.run_dir}))

    def _report_failures(self, job: Job, seen: int) -> int:
        """Notify each failed attempt of the job's run not yet notified; the new count."""
        if not self.notifier.wants("failure"):
            return seen
        try:
            record = run_record.load(RunDir(Path(job.run_dir)).record)
        except RecordError:
            return seen
        if record is None:
            return seen
        failed = [a for a in record.attempts if a.classification is not None
                  and a.classification.is_failure]
        for a in failed[seen:]:
            self.notifier.send(Message(
                "failure", f"{job.name}: attempt {a.attempt} failed",
                f"{a.classification.value if a.classification else '?'} at step "
                f"{a.end_step}: {a.detail[:300]}",
                {"queue": str(self.dir), "job": job.name, "attempt": a.attempt,
                 "run_dir": job.run_dir}))
        return max(seen, len(failed))

    def _wait_for_old_supervisor(self, job: Job) -> None:
        """A runner that died left its job supervisor stopping (its orphan guard sent it
        SIGTERM): wait until it lets go of the run directory."""
        lock = RunDir(Path(job.run_dir)).lock
        holder = read_holder(lock)
        if not is_locked(lock) or holder is None or holder.role is not Role.SUPERVISOR:
            return
        grace = _stop_grace(job)
        self.log.info("job_waiting_for_old_supervisor", job=job.name, pid=holder.pid,
                      wait_s=grace)
        self._say(f"{job.name}: waiting for the previous supervisor (PID {holder.pid}) to "
                  "checkpoint and stop")
        deadline = time.monotonic() + grace
        while is_locked(lock) and time.monotonic() < deadline and self.signalled is None:
            self._sleep(POLL)

    # ---- helpers -------------------------------------------------------------------------

    def _update(self, name: str, **changes: Any) -> None:
        queue_file.update(self.dir, lambda q: (q.with_job(replace(q.find(name), **changes)),
                                               None))

    def _console(self, job: Job) -> Path:
        return self.dir / "logs" / f"{job.name}.console.log"

    def _sleep(self, seconds: float, popen: subprocess.Popen[bytes] | None = None) -> None:
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(seconds)
        else:
            time.sleep(seconds)
        now = time.monotonic()
        if now >= self.next_watchdog:
            sdnotify.watchdog()
            interval = sdnotify.watchdog_interval()
            self.next_watchdog = now + (interval / 2 if interval else 10.0)

    def stop_child(self) -> None:
        """The runner itself failed: do not leave the job's supervisor behind (SIGTERM: it
        checkpoints and stops)."""
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def _say(self, text: str) -> None:
        print(f"overnight queue: {text}", file=sys.stderr, flush=True)


def _config_values(job: Job) -> dict[str, Any]:
    try:
        return config_mod.load(Path(job.config)).to_dict()
    except (OvernightError, OSError):
        return {}


def _stop_grace(job: Job) -> float:
    try:
        stop_timeout = config_mod.load(Path(job.config)).supervisor.stop_timeout
    except (ConfigError, OSError):
        stop_timeout = 120.0
    return stop_timeout + STOP_MARGIN


def _failures(job: Job) -> int:
    try:
        record = run_record.load(RunDir(Path(job.run_dir)).record)
    except RecordError:
        return 0
    return record.totals.failures if record is not None else 0


def _facts(job: Job) -> Any:
    from supervisor.morning.runfacts import gather

    try:
        return gather(Path(job.run_dir), light=True)
    except (OvernightError, OSError):
        return None


def _verdict(job: Job) -> str:
    from supervisor.morning.verdict import describe

    facts = _facts(job)
    return describe(facts) if facts is not None else ""


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in tail_lines(path, 4096) if x.strip()]
    except OSError:
        return ""
    return lines[-1].decode(errors="replace").strip() if lines else ""


def _clock(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S") if t is not None else "-"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"
