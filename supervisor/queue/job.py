"""One job of the night: its supervisor started, watched, stopped, and its end read.

`JobRunner` is the part of the queue runner (supervisor/queue/night.py, whose docstring says
what the night promises) that runs one job: start `overnight run JOB.yaml --run-dir
RUN_DIR` in the job's working directory with an orphan guard (supervisor/daemon/spawn.py:
the job supervisor is SIGTERMed — checkpoint, stop — however the runner dies), pass on a
signal or the deadline as SIGTERM, notify each failed attempt when asked, and read how the
job ended from its run.json (shared/run_record.py): finished, early_stopped, gave_up,
deadline, stopped by hand — or not ended (its supervisor failed: started again, at most
SUPERVISOR_RETRIES times in a row; the runner was stopped: the job stays `running`).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from shared import config as config_mod
from shared import queue_file, run_record
from shared.errors import ConfigError, OvernightError, RecordError
from shared.exitcodes import ExitCode
from shared.layout import RunDir
from shared.queue_file import Job, JobState, Queue, now_iso
from shared.runlock import Role, is_locked
from shared.runlock import read as read_holder
from shared.tail import tail_lines
from supervisor.daemon import sdnotify, spawn
from supervisor.queue.notify import Message, Notifier

POLL = 0.5  # seconds between looks at the job supervisor, the clock and the signals
FAILURE_CHECK_EVERY = 2.0  # seconds between reads of the job's run.json for failures
SUPERVISOR_RETRIES = 3
SUPERVISOR_BACKOFF = 2.0  # seconds before a failed job supervisor is started again
STOP_MARGIN = 60.0  # seconds beyond the job's stop_timeout for its supervisor to stop
DEADLINE_ASK_S = 5.0  # seconds the job's supervisor has to answer the deadline's stop request
SUPERVISOR_RUN = [sys.executable, "-m", "supervisor.cli", "run"]


class JobRunner:
    """Runs one job at a time for the night (module docstring). `signalled` is set by the
    runner's signal handler; `until` is the deadline (epoch seconds) or None."""

    def __init__(self, queue_dir: Path, until_text: str, log: Any, notifier: Notifier) -> None:
        self.dir = queue_dir
        self.until_text = until_text
        self.log = log
        self.notifier = notifier
        self.until: float | None = None
        self.signalled: int | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self.next_watchdog = 0.0

    def _past_deadline(self) -> bool:
        return self.until is not None and time.time() >= self.until

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
                    end, reason = JobState.DEADLINE, (f"the deadline {clock(self.until)} came "
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
        except OSError as e:  # its directory is gone, say: the job cannot run
            self.log.error("job_start_failed", job=job.name, cwd=job.cwd, error=str(e))
            out.write(f"overnight queue: cannot start the job's supervisor in {job.cwd} "
                      f"({e.strerror or e})\n".encode())
            out.close()
            return int(ExitCode.BAD_CONFIG), ""
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
                    how = self._stop_for_deadline(job, popen)
                    self.log.info("job_stop_requested", job=job.name, why=why,
                                  until=self.until_text, how=how)
                    self._say(f"{job.name}: the deadline ({clock(self.until)}) has come: "
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

    def _stop_for_deadline(self, job: Job, popen: subprocess.Popen[bytes]) -> str:
        """Ask the job's supervisor to stop over its control socket, saying it is the
        deadline (its run.json and report then say "stopped on request: the queue's
        deadline 07:00 came", not a bare "stop on request"); SIGTERM when it cannot be
        asked (still starting, or not answering within DEADLINE_ASK_S). Returns how."""
        from supervisor.morning.status import request

        try:
            reply = request(RunDir(Path(job.run_dir)), "stop", DEADLINE_ASK_S,
                            f"the queue's deadline {clock(self.until)} came")
            if reply.ok:
                return "control"
        except (OvernightError, OSError) as e:
            self.log.info("job_stop_by_signal", job=job.name, error=str(e))
        popen.send_signal(signal.SIGTERM)
        return "SIGTERM"

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
                return JobState.DEADLINE, (f"stopped at the deadline {clock(self.until)} at "
                                           f"step {record.final_step}")
            if state is run_record.State.STOPPED and why == "signal":
                return None, f"interrupted at step {record.final_step}: the runner was stopped"
            if state is run_record.State.STOPPED:
                return JobState.STOPPED, f"stopped by hand ({reason})"
        last = _last_line(self._console(job))
        if why == "deadline":  # our SIGTERM came before its supervisor could catch it
            step = record.final_step if record is not None else 0
            return JobState.DEADLINE, (f"stopped at the deadline {clock(self.until)} at step "
                                       f"{step} (exit {rc})")
        if rc == ExitCode.BAD_CONFIG and "in use" not in last:
            return JobState.GAVE_UP, f"refused to start: {last}"
        if why == "signal":
            return None, "interrupted: the runner was stopped"
        return None, f"its supervisor ended with exit {rc}: {last}"

    def _finish(self, job: Job, end: JobState, reason: str) -> None:
        self._update(job.name, state=end, reason=reason, ended=now_iso())
        verdict = _verdict(job)
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


def facts_of(job: Job) -> Any:
    from supervisor.morning.runfacts import gather

    try:
        return gather(Path(job.run_dir), light=True)
    except (OvernightError, OSError):
        return None


def _verdict(job: Job) -> str:
    from supervisor.morning.verdict import describe

    facts = facts_of(job)
    return describe(facts) if facts is not None else ""


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in tail_lines(path, 4096) if x.strip()]
    except OSError:
        return ""
    return lines[-1].decode(errors="replace").strip() if lines else ""


def clock(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S") if t is not None else "-"
