"""The supervisor loop: observe (telemetry, control requests, child exit, timers), turn what
it sees into events, run them through `state.transition`, execute the returned actions.

One thread. A zmq Poller waits on the telemetry SUB socket, the control REP socket and a
signal wake-up fd: SIGCHLD wakes the loop the moment the worker dies (crash detection does
not wait for a missing heartbeat), SIGTERM/SIGINT/SIGHUP become a graceful stop. The poll
timeout (at most 0.5 s) bounds the reaction to timers and is the fallback if a signal is
missed. Attempt bookkeeping lives in supervisor/attempt.py.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import zmq

from shared.errors import ProtocolError
from shared.protocol import decode
from supervisor.daemon import memory, watch
from supervisor.daemon.attempt import AttemptRunner
from supervisor.daemon.control import ControlError, ControlServer
from supervisor.daemon.record import RunRecord
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
    StopRequested,
    StopTimedOut,
    Terminate,
    WorkerExited,
    transition,
)

try:  # written by a colleague; the loop works without it
    from supervisor.daemon import sdnotify
except ImportError:  # pragma: no cover
    sdnotify = None  # type: ignore[assignment]

MAX_POLL = 0.5
RECORD_EVERY = 2.0  # seconds between progress-only record writes
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Supervisor:
    def __init__(
        self, *, runner: AttemptRunner, record: RunRecord, telemetry: zmq.Socket[Any],
        control: ControlServer | None, log: Any, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.opts = runner.opts
        self.record = record
        self.telemetry = telemetry
        self.control = control
        self.log = log
        self.clock = clock
        self.state = State.STARTING  # a restarted supervisor starts over from here too
        self.restart_at: float | None = None
        self.next_sample = 0.0
        self.next_watchdog = 0.0
        self.record_due = 0.0
        self.signalled: list[int] = []
        self.ready_sent = False
        self.final_reason = ""

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
            self.record.set_state(new.value, reason)
            if sdnotify is not None:
                sdnotify.status(f"{new.value}: {reason}"[:200])
        for action in actions:
            self._execute(action)

    def _execute(self, action: Any) -> None:
        now = self.clock()
        match action:
            case Spawn():
                self._spawn()
            case Terminate(reason=reason):
                self.runner.terminate(reason, now)
            case Kill():
                self.runner.kill()
            case RequestCheckpoint():
                self.runner.request_checkpoint()
            case ScheduleRestart(delay=delay):
                self.restart_at = now + delay
                self.log.info("restart_scheduled", delay_s=round(delay, 3))
            case Finish(reason=reason):
                self.final_reason = reason
                self.record.set_state(self.state.value, reason)
                self.log.info("run_ended", state=self.state.value, reason=reason,
                              final_step=self.record.data.get("final_step"))

    def _spawn(self) -> None:
        self.restart_at = None
        try:
            attempt, pid = self.runner.start(self.clock())
        except OSError as e:
            self.log.error("worker_spawn_failed", error=str(e))
            self.dispatch(SpawnFailed(str(e)))
            return
        self.next_sample = self.clock() + self.opts.sample_interval
        self.dispatch(Spawned(attempt, pid))
        if not self.ready_sent and sdnotify is not None:
            sdnotify.ready()
        self.ready_sent = True

    # ---- observations ------------------------------------------------------------------

    def _on_telemetry(self, raw: bytes) -> None:
        try:
            msg = decode(raw)
        except ProtocolError as e:
            self.log.warning("telemetry_invalid", error=str(e))
            return
        view = self.runner.view
        if view is None or not view.accepts(msg):
            return
        if view.update(msg, self.clock()) and self.state is State.STARTING:
            self.dispatch(Progressed(view.step))
        self.runner.on_message(msg)

    def _check_worker(self) -> None:
        if not self.state.has_worker:
            return
        rc = self.runner.poll()
        if rc is None:
            return
        decision = self.runner.finish(rc, self.clock())
        self.dispatch(WorkerExited(decision.verdict, decision.reason, decision.delay))

    def _check_timers(self) -> None:
        now = self.clock()
        view = self.runner.view
        if self.state in (State.STARTING, State.TRAINING) and view is not None:
            found = watch.check(view, self.opts, now)
            if found is not None:
                kind, seconds = found
                detail = (f"no heartbeat for {seconds:.1f} s" if kind == "hang"
                          else f"no step for {seconds:.1f} s while heartbeats continue")
                self.runner.note_detection(kind, detail, seconds)
                self.dispatch(HeartbeatLost(seconds) if kind == "hang" else Stalled(seconds))
            elif now >= self.next_sample:
                self.next_sample = now + self.opts.sample_interval
                s = memory.sample(view.pid, time.time(), view.step, view.active_mb)
                reason = self.runner.add_sample(s) if s is not None else None
                if reason is not None:
                    self.runner.note_detection("memory", reason, 0.0)
                    self.dispatch(MemoryHigh(reason))
        if self.state is State.STOPPING:
            waited = self.runner.stop_overdue(now)
            if waited is not None:
                self.dispatch(StopTimedOut(waited))
        if (self.state is State.BACKING_OFF and self.restart_at is not None
                and now >= self.restart_at):
            self.dispatch(BackoffElapsed())

    def _timeout(self) -> float:
        now = self.clock()
        deadlines = [now + MAX_POLL]
        if self.restart_at is not None:
            deadlines.append(self.restart_at)
        if self.runner.stop_deadline is not None:
            deadlines.append(self.runner.stop_deadline)
        view = self.runner.view
        if self.state in (State.STARTING, State.TRAINING) and view is not None:
            deadlines.append(watch.heartbeat_deadline(view, self.opts))
        return max(0.0, min(deadlines) - now)

    # ---- control target ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.runner.status(self.state, self.restart_at, self.clock())

    def request_stop(self, source: str) -> dict[str, Any]:
        self.log.info("stop_requested", source=source, state=self.state.value)
        if sdnotify is not None:
            sdnotify.stopping()  # the service manager should now wait up to stop_timeout
        self.dispatch(StopRequested(source))
        return {"state": self.state.value, "supervisor_pid": self.runner.supervisor_pid,
                "stop_timeout": self.opts.stop_timeout}

    def request_checkpoint(self, source: str) -> dict[str, Any]:
        view = self.runner.view
        if self.state not in (State.STARTING, State.TRAINING) or view is None:
            raise ControlError(f"no worker is training (state {self.state.value})")
        self.log.info("checkpoint_requested", source=source, step=view.step)
        self.dispatch(CheckpointRequested(source))
        return {"worker_pid": view.pid, "step": view.step}

    # ---- the loop ----------------------------------------------------------------------

    def run(self, first: Event) -> State:
        """Run until a final state; returns it. Installs signal handlers when on the main
        thread (and restores them on the way out)."""
        with _Signals(self.signalled) as wake:
            poller = zmq.Poller()
            poller.register(self.telemetry, zmq.POLLIN)
            if self.control is not None:
                poller.register(self.control.socket, zmq.POLLIN)
            if wake is not None:
                poller.register(wake, zmq.POLLIN)
            self.dispatch(first)
            while not self.state.is_final:
                ready = dict(poller.poll(self._timeout() * 1000))
                if wake is not None and wake in ready:
                    _drain(wake)
                self._tick()
        return self.state

    def _tick(self) -> None:
        while self.signalled:
            sig = self.signalled.pop(0)
            self.log.info("supervisor_signal", signal=signal.Signals(sig).name)
            self.request_stop("signal")
        for _ in range(1000):
            try:
                raw = self.telemetry.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._on_telemetry(raw)
        if self.control is not None:
            self.control.serve_ready(self.log)
        self._check_worker()
        self._check_timers()
        now = self.clock()
        if sdnotify is not None and now >= self.next_watchdog:
            sdnotify.watchdog()
            interval = sdnotify.watchdog_interval()
            self.next_watchdog = now + (interval / 2 if interval else 10.0)
        if self.runner.progress_dirty and now >= self.record_due:
            self.runner.save_progress()
            self.record_due = now + RECORD_EVERY


def _reason(event: Event) -> str:
    match event:
        case WorkerExited(reason=reason) | SpawnFailed(error=reason) | MemoryHigh(detail=reason):
            return reason
        case HeartbeatLost(silent_seconds=s):
            return f"no heartbeat for {s:.1f} s"
        case Stalled(seconds_without_step=s):
            return f"no step for {s:.1f} s"
        case StopRequested(source=source):
            return f"stop requested ({source})"
        case Spawned(attempt=attempt, pid=pid):
            return f"attempt {attempt} started (pid {pid})"
        case Progressed(step=step):
            return f"training started (step {step})"
        case BackoffElapsed():
            return "restart delay elapsed"
    return ""


class _Signals:
    """SIGCHLD (wake up), SIGTERM/SIGINT/SIGHUP (graceful stop) through a wake-up socket."""

    def __init__(self, queue: list[int]) -> None:
        self.queue = queue
        self.saved: dict[int, Any] = {}
        self.pair: tuple[socket.socket, socket.socket] | None = None
        self.old_fd = -1

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.queue.append(signum)

    def __enter__(self) -> socket.socket | None:
        if threading.current_thread() is not threading.main_thread():
            return None
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self.pair = (r, w)
        self.saved[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda s, f: None)
        for sig in SIGNALS:
            self.saved[sig] = signal.signal(sig, self._on_stop)
        self.old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        return r

    def __exit__(self, *exc: object) -> None:
        if self.pair is None:
            return
        signal.set_wakeup_fd(self.old_fd)
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        for s in self.pair:
            s.close()


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while sock.recv(4096):
            pass
