"""The supervisor loop: observe (telemetry, control requests, child exit, timers), turn what
it sees into events, run them through `state.transition`, execute the returned actions.

One thread, which never blocks for long. A zmq Poller waits on the telemetry SUB socket, the
control REP socket and a wake-up socket: SIGCHLD wakes the loop the moment the worker dies
(crash detection does not wait for a missing heartbeat), SIGTERM/SIGINT/SIGHUP become a
graceful stop, and the checkpoint validation that precedes every start runs in a thread
(supervisor/daemon/checkpoint_choice.py) that wakes the loop when it is done. The poll
timeout (at most 0.5 s) bounds the reaction to timers and is the fallback if a wake-up is
missed; every pass sends the systemd watchdog when it is due (WATCHDOG_SEC in
supervisor/service/systemd.py says what that guarantees). After taking telemetry in, the
loop leaves the telemetry socket out of its poll for up to TELEMETRY_EVERY (0.25 s), so one
wake-up takes in several of the worker's 50 ms flushes; the metrics batches among them are
read and believed column by column (shared/step_columns.py) and go into the run record once
a pass. Attempts are run by
supervisor/daemon/runner.py. The clock, the service-manager notifier and the way background
work runs are constructor arguments, so tests replay histories with fakes.

What arrives on the sockets is the outside world: a telemetry message is believed only when
supervisor/daemon/telemetry_gate.py says so (the running attempt's token, steps forward and
within the run); the rest is counted and logged (`telemetry_rejected`, at most once per
LOG_EVERY seconds). And whatever a message does, it does not end the supervisor: an
exception while taking one in is counted and logged with its traceback
(`telemetry_ingest_failed`, also rate-limited), and the loop goes on.

Longer than 400 lines: the observations, the actions and the control target share one
object's state (the state, the timers, the attempt); split, they would pass it all around.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import zmq

from shared import config as config_mod
from shared import step_columns
from shared.errors import OvernightError, ProtocolError
from shared.exitcodes import FailureClass
from shared.protocol import Message, StepMetrics, decode_all
from supervisor.daemon import group_watch, memory, sdnotify, watch
from supervisor.daemon.checkpoint_choice import Background, Job, ThreadJob
from supervisor.daemon.control import ControlError, ControlServer, RankStatus, RunStatus
from supervisor.daemon.powerwatch import PowerWatch
from supervisor.daemon.record import RecordKeeper
from supervisor.daemon.runner import AttemptRunner
from supervisor.daemon.sdnotify import Notifier
from supervisor.daemon.sockets import LOG_EVERY, Every
from supervisor.daemon.state import (
    BackoffElapsed,
    CheckpointRequested,
    Event,
    Finish,
    HeartbeatLost,
    Kill,
    MemoryHigh,
    Progressed,
    RequestCheckpoint,
    ScheduleRestart,
    Spawn,
    Spawned,
    SpawnFailed,
    Stalled,
    State,
    StopReason,
    StopRequested,
    StopTimedOut,
    Terminate,
    WorkerExited,
    transition,
)
from supervisor.daemon.telemetry_gate import TelemetryGate

MAX_POLL = 0.5
LAST_WORDS = 0.1  # seconds: a worker's last messages may trail its exit (_last_words)
MAX_TELEMETRY_PER_PASS = 1000  # messages taken in per pass (the rest wait for the next one)
# Seconds telemetry may wait in its queue: after an intake the loop stops polling the
# telemetry socket this long, so one wake-up takes in several 50 ms flushes (a wake-up of
# this loop costs ~0.3-0.6 ms of CPU from cold caches, more than the messages: at 150
# steps/s, 20 wake-ups a second were most of the supervisor's 1.4% of a core). Anything
# else (a signal, SIGCHLD, a control request, a timer) still wakes it at once, and every
# pass takes in what is queued before it judges a hang.
TELEMETRY_EVERY = 0.25
RECORD_EVERY = 2.0  # seconds between progress-only record writes
WATCHDOG_DEFAULT = 10.0  # seconds between WATCHDOG=1 when systemd gives no interval
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# The next worker starts at the beginning of a backoff of at most this many seconds (and at
# most half of startup_timeout, which bounds its wait for the checkpoint choice) ...
BACKOFF_EARLY_START_MAX_S = 60.0
# ... after these ends only: none whose backoff waits for memory, heat, Metal, disk or power.
EARLY_START_AFTER = frozenset({
    FailureClass.CRASH, FailureClass.HANG, FailureClass.STALL, FailureClass.PLANNED_RESTART,
    FailureClass.NON_FINITE, FailureClass.GRAD_SPIKE, FailureClass.CHECKPOINT_REFUSED,
    FailureClass.MACHINE_RESTARTED,
})


class Supervisor:
    def __init__(
        self, *, runner: AttemptRunner, record: RecordKeeper, telemetry: zmq.Socket[Any],
        control: ControlServer | None, log: Any, clock: Callable[[], float] = time.monotonic,
        notifier: Notifier = sdnotify, background: Background = ThreadJob,
        power: PowerWatch | None = None,
    ) -> None:
        self.runner = runner
        self.opts = runner.opts
        self.record = record
        self.telemetry = telemetry
        self.control = control
        self.log = log
        self.clock = clock
        self.notifier = notifier
        self.background = background
        self.power = power  # battery and heat (powerwatch.py); None: not watched
        self.state = State.STARTING  # a restarted supervisor starts over from here too
        self.restart_at: float | None = None
        self.choice: Job | None = None  # the checkpoint validation before a start
        self.next_sample = 0.0
        self.next_watchdog = 0.0
        self.record_due = 0.0
        self.signalled: list[int] = []
        self.wake: Callable[[], None] = lambda: None
        self.ready_sent = False
        self.final_reason = ""
        self.gate = TelemetryGate()
        self.intake_at = 0.0  # time.monotonic() before which telemetry waits (TELEMETRY_EVERY)
        self.record_step: StepMetrics | None = None  # a pass's last believed step, for the record
        self.ingest_failures = 0  # messages whose processing raised (logged, survived)
        self._rejected_log, self._failed_log = Every(LOG_EVERY), Every(LOG_EVERY)

    # ---- events in, actions out --------------------------------------------------------

    def dispatch(self, event: Event) -> None:
        old = self.state
        new, actions = transition(old, event)
        if new is old and not actions:
            if not isinstance(event, Progressed):
                self.log.debug("event_ignored", state=old.value, event_type=type(event).__name__)
            return
        self.state = new
        if new is not old:
            reason = _reason(event)
            self.log.info("state_changed", from_state=old.value, to_state=new.value,
                          event_type=type(event).__name__, reason=reason)
            self.record.set_state(new, reason)
            self.notifier.status(f"{new.value}: {reason}"[:200])
        for action in actions:
            self._execute(action)

    def _execute(self, action: Any) -> None:
        now = self.clock()
        attempt = self.runner.attempt
        match action:
            case Spawn():
                self.restart_at = None
                if self.runner.early is None:  # not already started during the backoff
                    try:  # the worker imports and loads while the checkpoint is validated
                        self._start_early()
                    except OSError as e:
                        self.log.error("worker_spawn_failed", error=str(e))
                        self.dispatch(SpawnFailed(str(e)))
                        return
                self.log.info("checkpoint_validation_started")
                self.choice = self.background(self.runner.chooser(), self.wake)
                self._check_choice()
            case Terminate(reason=reason):
                if attempt is not None and attempt.terminate(reason, now):
                    self.log.info("worker_terminate", reason=reason.value, worker_pid=attempt.pid,
                                  stop_timeout=self.opts.stop_timeout)
            case Kill():
                if attempt is not None:
                    self.log.warning("worker_kill", worker_pid=attempt.pid,
                                     waited_s=self.opts.stop_timeout)
                    attempt.stopping.kill(attempt.proc)
            case RequestCheckpoint():
                if attempt is not None:
                    attempt.request_checkpoint()
            case ScheduleRestart(delay=delay):
                self.restart_at = now + delay
                self.log.info("restart_scheduled", delay_s=round(delay, 3))
                self._start_during_backoff(delay)
            case Finish(reason=reason):
                self.final_reason = reason
                self.record.set_state(self.state, reason)
                self.log.info("run_ended", state=self.state.value, reason=reason,
                              final_step=self.record.record.final_step,
                              telemetry_rejected=self.gate.rejected)

    def _start_during_backoff(self, delay: float) -> None:
        """Start the next attempt's worker now, at the start of the backoff, so its imports
        and model load (seconds: ~2-5 s for SmolLM2-135M here) overlap the delay instead of
        following it; it waits for its checkpoint choice (validated when the backoff ends)
        over its pipe (supervisor/daemon/early_start.py), bounded by startup_timeout.
        Not after an end whose backoff is a wait for something the new worker would compete
        with or could not use (EARLY_START_AFTER excludes memory, the GPU watchdog's
        cool-down, Metal's buffer limit, a full disk, a battery pause), nor for a delay too
        long to keep a loaded model idle (BACKOFF_EARLY_START_MAX_S)."""
        last = self.record.attempts[-1] if self.record.attempts else None
        if (delay > BACKOFF_EARLY_START_MAX_S or delay * 2 > self.opts.startup_timeout
                or last is None or last.classification not in EARLY_START_AFTER):
            return
        try:
            self._start_early()
        except OSError as e:  # tried again, and reported, when the backoff ends
            self.log.warning("worker_early_start_failed", error=str(e))

    def _start_early(self) -> None:
        """Start the next attempt's worker before its checkpoint is chosen
        (runner.start_early) and let the gate expect its telemetry. OSError: not started."""
        token = self.runner.start_early()
        if token is not None:
            self.gate.expect(token)

    def _check_choice(self) -> None:
        """Once the checkpoint validation is done: spawn the worker (if still wanted)."""
        job = self.choice
        if job is None or not job.done():
            return
        self.choice = None
        if self.state not in (State.STARTING, State.RESTARTING):
            self.runner.abandon_early()
            return  # stopped meanwhile
        try:
            choice = job.result()
            attempt, pid = self.runner.start(choice, self.clock())
        except Exception as e:  # OSError: cannot start; anything else: cannot read the run
            self.log.error("worker_spawn_failed", error=str(e))
            self.dispatch(SpawnFailed(str(e)))
            return
        self.next_sample = self.clock() + self.opts.sample_interval
        running = self.runner.attempt
        if running is not None:  # from now on, messages with its token are believed
            self.gate.begin(attempt, pid, running.token, self._iters(), running.rank_pids)
        self.dispatch(Spawned(attempt, pid))
        if not self.ready_sent:
            self.notifier.ready()
        self.ready_sent = True

    # ---- observations ------------------------------------------------------------------

    def _iters(self) -> int:
        """The total steps of the attempt just started: `iters` as its worker reads it from
        the config file (not in the config hash: a user may raise it between attempts),
        never below what this supervisor started with."""
        iters = self.runner.config.iters
        with contextlib.suppress(OvernightError, OSError):
            iters = max(iters, config_mod.load(self.runner.config_path).iters)
        return iters

    def _take_telemetry(self) -> None:
        """Take in what is waiting on the telemetry socket: the ingest boundary."""
        for taken in range(MAX_TELEMETRY_PER_PASS):
            try:
                raw = self.telemetry.recv(zmq.NOBLOCK)
            except zmq.Again:
                if taken:
                    self.intake_at = time.monotonic() + TELEMETRY_EVERY
                break
            try:
                self._on_telemetry(raw)
            except Exception:  # a message must never end the supervisor
                self.ingest_failures += 1
                if new := self._failed_log.due(self.ingest_failures, self.clock()):
                    self.log.error("telemetry_ingest_failed", count=self.ingest_failures,
                                   new=new, exc_info=True)
        self._fold_steps()
        if new := self._rejected_log.due(self.gate.rejected, self.clock()):
            self.log.warning("telemetry_rejected", count=self.gate.rejected, new=new,
                             first_reason=self.gate.first_reason,
                             last_reason=self.gate.last_reason)

    def _fold_steps(self) -> None:
        """The last believed step of a pass's metrics batches into the record, once."""
        if self.record_step is not None and self.runner.attempt is not None:
            self.runner.on_message(self.record_step)
        self.record_step = None

    def _on_telemetry(self, raw: bytes) -> None:
        # A flush's steps (most of what arrives) are read and believed column by column
        # (shared/step_columns.py); the rest, a group's, an attempt's first steps (they move
        # it to training) and anything that reader is unsure of go message by message.
        batch = step_columns.parse(raw)
        attempt = self.runner.attempt
        if batch is not None and self.state is not State.STARTING and (
                attempt is None or attempt.group is None):
            rows = self.gate.admit_steps(batch)
            if rows and attempt is not None and attempt.view.attempt == batch.attempt:
                attempt.view.update_steps(batch, rows, self.clock())
                self.record_step = batch.row(rows[-1])  # the record: the pass's last step
            return
        try:
            messages = decode_all(raw)  # a flush's steps come folded: each as its own
        except ProtocolError as e:
            self.gate.reject(f"not a message: {e}")
            return
        if len(messages) == 1:
            self._on_message(messages[0])
            return
        # A metrics_batch: the view takes every step, the record the last believed one at
        # once (for metrics the record only copies the view's step: runner.on_message).
        believed = [msg for msg in messages if self._on_message(msg, to_record=False)]
        if believed and self.runner.attempt is not None:
            self.runner.on_message(believed[-1])

    def _on_message(self, msg: Message, to_record: bool = True) -> bool:
        """Take in one believed message; False when the gate or the view refuses it."""
        if not self.gate.admit(msg):
            return False
        attempt = self.runner.attempt
        if attempt is not None and attempt.group is not None:  # a group: every rank's
            attempt.group.update(msg, self.clock())  # heartbeat and step (group_watch.py)
            if msg.rank:  # type: ignore[union-attr]
                return False  # rank 0 alone speaks for the run (metrics, checkpoints, ...)
        if attempt is None or not attempt.view.accepts(msg):
            return False
        if attempt.view.update(msg, self.clock()) and self.state is State.STARTING:
            self.dispatch(Progressed(attempt.view.step))
        if to_record:
            self.runner.on_message(msg)
        return True

    def _check_worker(self) -> None:
        attempt = self.runner.attempt
        if not self.state.has_worker or attempt is None:
            return
        rc = attempt.poll()
        if rc is None:
            return
        if rc >= 0:
            self._last_words()
        self.gate.end()  # what its worker still sends is late, not believed
        decision = self.runner.finish(rc, self.clock())
        self.dispatch(WorkerExited(decision.verdict, decision.reason, decision.delay))

    def _last_words(self) -> None:
        """Read what a worker that exited on its own sent just before (its `stopping`
        message): SIGCHLD can wake the loop before ZeroMQ has handed those messages over.
        Waits at most LAST_WORDS seconds, and only as long as nothing arrives."""
        deadline = time.monotonic() + LAST_WORDS
        while (left := deadline - time.monotonic()) > 0 and self.telemetry.poll(
                max(1, int(left * 1000))):
            self._take_telemetry()

    def _check_timers(self) -> None:
        now = self.clock()
        attempt = self.runner.attempt
        if self.state in (State.STARTING, State.TRAINING) and attempt is not None:
            found = None if attempt.group_ending else group_watch.check(
                attempt.view, attempt.group, self.opts, now)
            if found is not None:
                kind, seconds, detail, rank = found
                attempt.notice(kind, detail, seconds, rank)
                self.log.warning("worker_unhealthy", kind=kind, detail=detail,
                                 **({"rank": rank} if rank is not None else {}))
                self.dispatch(HeartbeatLost(seconds) if kind == "hang" else Stalled(seconds))
            elif now >= self.next_sample:
                self.next_sample = now + self.opts.sample_interval
                view = attempt.view
                s = memory.sample(view.pid, time.time(), view.step, view.active_mb,
                                  view.cache_mb, view.footprint_mb)
                reason = attempt.add_sample(s) if s is not None else None
                if reason is not None:
                    attempt.notice("memory", reason, 0.0)
                    self.log.warning("worker_unhealthy", kind="memory", detail=reason)
                    self.dispatch(MemoryHigh(reason))
        self._planned_stop(now)
        if self.state is State.STOPPING and attempt is not None:
            waited = attempt.stopping.overdue(now)
            if waited is not None:
                self.dispatch(StopTimedOut(waited))
        if (self.state is State.BACKING_OFF and self.restart_at is not None
                and now >= self.restart_at):
            wait = self.runner.space_wait(now)  # after a full disk: room for a checkpoint?
            if wait is None and self.power is not None:
                wait = self.power.wait(now)  # paused on battery: on AC again?
            if wait is not None:
                self.restart_at = now + wait
                self.runner.abandon_early()  # waiting for room or power: no idle worker
            else:
                self.dispatch(BackoffElapsed())

    def _planned_stop(self, now: float) -> None:
        """Read battery and heat when due (powerwatch.py); stop a training worker for a
        recycle before Metal's resource limit (runner.recycle_due) or a pause on battery."""
        attempt = self.runner.attempt
        training = self.state is State.TRAINING and attempt is not None
        pause = self.power.poll(now, training) if self.power is not None else None
        if not training or attempt is None:
            return
        recycle = self.runner.recycle_due(attempt)
        for kind, why, reason in (("recycle", recycle, StopReason.RECYCLE),
                                  ("power", pause, StopReason.POWER)):
            if why is not None and self.state is State.TRAINING:
                attempt.notice(kind, why, 0.0)
                self.log.info("worker_planned_stop", kind=kind, detail=why)
                self.dispatch(MemoryHigh(why, reason))

    def _timeout(self) -> float:
        now = self.clock()
        deadlines = [now + MAX_POLL]
        if self.restart_at is not None:
            deadlines.append(self.restart_at)
        attempt = self.runner.attempt
        if attempt is not None and attempt.stopping.deadline is not None:
            deadlines.append(attempt.stopping.deadline)
        if attempt is not None and (due := getattr(attempt.proc, "next_deadline", None)):
            group_due = due()  # a group's ranks get SIGTERM / SIGKILL from its poll()
            if group_due is not None:
                deadlines.append(group_due)
        if self.state in (State.STARTING, State.TRAINING) and attempt is not None:
            deadlines.append(watch.heartbeat_deadline(attempt.view, self.opts))
        return max(0.0, min(deadlines) - now)

    # ---- control target ----------------------------------------------------------------

    def status(self) -> RunStatus:
        now, r = self.clock(), self.record.record
        attempt = self.runner.attempt if self.state.has_worker else None
        view = attempt.view if attempt is not None else None
        best = r.best_checkpoint
        if best is not None and best.path is None:  # written after the evaluation said so
            path = self.runner.run.checkpoint_dir(best.step)
            if path.is_dir():
                best = dataclasses.replace(best, path=str(path))
        return RunStatus(
            run_id=r.run_id, run_dir=str(self.runner.run.root), state=self.state,
            reason=r.reason, supervisor_pid=self.runner.supervisor_pid,
            worker_pid=view.pid if view else None, attempt=len(r.attempts),
            phase=view.phase if view else None,
            step=view.step if view else r.final_step, total_steps=r.total_steps,
            last_heartbeat_s=round(now - view.last_seen, 2) if view else None,
            tokens_per_sec=_round(view.tokens_per_sec) if view else None,
            rss_mb=_round(view.rss_mb) if view else None,
            mlx_mb=_round(view.active_mb) if view else None,
            overrides=r.overrides, latest_checkpoint=r.latest_checkpoint, best_checkpoint=best,
            restart_in_s=round(self.restart_at - now, 1) if self.restart_at is not None
            else None,
            attempts=len(r.attempts), failures=r.totals.failures,
            telemetry_rejected=self.gate.rejected,
            ranks=tuple(RankStatus(r.rank, pid, r.phase, r.step, round(now - r.last_seen, 2))
                        for r, pid in zip(attempt.group.ranks, attempt.rank_pids, strict=True))
            if attempt is not None and attempt.group is not None else (),
        )

    def request_stop(self, source: str, reason: str = "") -> dict[str, Any]:
        """A stop from the control socket ("control", with the requester's `reason`, "" for
        none) or a signal; the reason goes into the attempt's end and the run's reason."""
        self.log.info("stop_requested", source=source, state=self.state.value,
                      **({"reason": reason} if reason else {}))
        self.notifier.stopping()  # the service manager should now wait up to stop_timeout
        attempt = self.runner.attempt
        if attempt is not None and reason and not attempt.stop_note:
            attempt.stop_note = reason
        self.dispatch(StopRequested(source, worker_running=attempt is not None, reason=reason))
        return {"state": self.state.value, "supervisor_pid": self.runner.supervisor_pid,
                "stop_timeout": self.opts.stop_timeout}

    def request_checkpoint(self, source: str) -> dict[str, Any]:
        attempt = self.runner.attempt
        if self.state not in (State.STARTING, State.TRAINING) or attempt is None:
            raise ControlError(f"no worker is training (state {self.state.value})")
        self.log.info("checkpoint_requested", source=source, step=attempt.view.step)
        self.dispatch(CheckpointRequested(source))
        return {"worker_pid": attempt.pid, "step": attempt.view.step}

    # ---- the loop ----------------------------------------------------------------------

    def run(self, first: Event) -> State:
        """Run until a final state; returns it. Installs signal handlers when on the main
        thread (and restores them on the way out)."""
        with _Wakeup(self.signalled) as wakeup:
            self.wake = wakeup.wake
            poller = zmq.Poller()
            poller.register(self.telemetry, zmq.POLLIN)
            if self.control is not None:
                poller.register(self.control.socket, zmq.POLLIN)
            # pyzmq hands a registered plain socket back as its file descriptor: register
            # and look for the fd (the socket object is never among the ready keys, which
            # left the wake-up byte unread and the loop spinning at 100% of a core).
            wake_fd = wakeup.reader.fileno()
            poller.register(wake_fd, zmq.POLLIN)
            registered = self.control.socket if self.control is not None else None
            polled = True  # the telemetry socket is in the poller (not after an intake)
            self.dispatch(first)
            while not self.state.is_final:
                if self.control is not None and self.control.socket is not registered:
                    poller.unregister(registered)  # the control socket was reopened
                    registered = self.control.socket
                    poller.register(registered, zmq.POLLIN)
                timeout = self._timeout()
                if (rest := self.intake_at - time.monotonic()) > 0:
                    timeout = min(timeout, rest)
                if polled and rest > 0:
                    poller.unregister(self.telemetry)
                    polled = False
                elif not polled and rest <= 0:
                    poller.register(self.telemetry, zmq.POLLIN)
                    polled = True
                ready = dict(poller.poll(math.ceil(timeout * 1000)))
                if wake_fd in ready:
                    _drain(wakeup.reader)
                self._tick()
        self.runner.abandon_early()  # a start that was still being prepared
        self.wake = lambda: None
        return self.state

    def _tick(self) -> None:
        while self.signalled:
            sig = self.signalled.pop(0)
            self.log.info("supervisor_signal", signal=signal.Signals(sig).name)
            self.request_stop("signal")
        self._take_telemetry()
        if self.control is not None:
            self.control.serve_ready(self.log)
        self._check_choice()
        self._check_worker()
        self._check_timers()
        now = self.clock()
        if now >= self.next_watchdog:
            self.notifier.watchdog()
            interval = self.notifier.watchdog_interval()
            self.next_watchdog = now + (interval / 2 if interval else WATCHDOG_DEFAULT)
        if self.runner.progress_dirty and now >= self.record_due:
            self.runner.save_progress()
            self.record_due = now + RECORD_EVERY


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _reason(event: Event) -> str:
    match event:
        case WorkerExited(reason=reason) | SpawnFailed(error=reason) | MemoryHigh(detail=reason):
            return reason
        case HeartbeatLost(silent_seconds=s):
            return f"no heartbeat for {s:.1f} s"
        case Stalled(seconds_without_step=s):
            return f"no step for {s:.1f} s"
        case StopRequested(source=source, reason=why):
            return f"stop requested ({source}{': ' + why if why else ''})"
        case Spawned(attempt=attempt, pid=pid):
            return f"attempt {attempt} started (pid {pid})"
        case Progressed(step=step):
            return f"training started (step {step})"
        case BackoffElapsed():
            return "restart delay elapsed"
    return ""


class _Wakeup:
    """A socket pair that wakes the loop: written by a background job when it is done, and by
    signals (on the main thread: SIGCHLD to wake up, SIGTERM/SIGINT/SIGHUP for a graceful
    stop, queued for the loop)."""

    def __init__(self, queue: list[int]) -> None:
        self.queue = queue
        self.saved: dict[int, Any] = {}
        self.reader, self.writer = socket.socketpair()
        self.old_fd: int | None = None

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.queue.append(signum)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self.writer.send(b"\0")

    def __enter__(self) -> _Wakeup:
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        if threading.current_thread() is threading.main_thread():
            self.saved[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda s, f: None)
            for sig in SIGNALS:
                self.saved[sig] = signal.signal(sig, self._on_stop)
            self.old_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.old_fd is not None:
            signal.set_wakeup_fd(self.old_fd)
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        self.reader.close()
        self.writer.close()


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while sock.recv(4096):
            pass
