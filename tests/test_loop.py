"""supervisor/daemon/loop.py with injected fakes (honcho style): a fake clock, a fake spawner whose
processes exit when told, and an in-process ZeroMQ socket pair for telemetry. No time passes,
no process starts: hang detection, stop escalation and restarts are replayed step by step."""

from __future__ import annotations

import random
import signal
from pathlib import Path
from typing import Any, ClassVar

import pytest
import structlog
import zmq

from shared.config import resolve
from shared.exitcodes import FailureClass
from shared.layout import RunDir
from shared.protocol import Heartbeat, Phase, StepMetrics
from shared.run_record import Detection
from supervisor.daemon.checkpoint_choice import InlineJob
from supervisor.daemon.loop import Supervisor
from supervisor.daemon.policy import Policy
from supervisor.daemon.record import RecordKeeper
from supervisor.daemon.runner import AttemptRunner
from supervisor.daemon.state import Begin, State


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.returncode

    def signal(self, sig: int) -> None:
        self.signals.append(sig)

    def signal_group(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self.returncode = -signal.SIGKILL


class FakeSpawner:
    def __init__(self) -> None:
        self.started: list[tuple[list[str], FakeProcess]] = []

    def spawn(self, argv, env, output: Path) -> FakeProcess:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.touch()
        proc = FakeProcess(1000 + len(self.started))
        self.started.append((list(argv), proc))
        return proc


class FakeNotifier:
    """Records what the loop tells the service manager (supervisor/daemon/sdnotify.py)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    def ready(self) -> bool:
        self.sent.append("READY=1")
        return True

    def watchdog(self) -> bool:
        self.sent.append("WATCHDOG=1")
        return True

    def stopping(self) -> bool:
        self.sent.append("STOPPING=1")
        return True

    def status(self, text: str) -> bool:
        self.sent.append(f"STATUS={text}")
        return True

    def watchdog_interval(self) -> float | None:
        return 4.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def rig(tmp_path):
    config = resolve({"model": "m", "data": "d", "iters": 100, "supervisor": {
        "heartbeat_timeout": 10, "startup_timeout": 30, "stop_timeout": 5,
        "backoff_initial": 1, "backoff_max": 1, "sample_interval": 1e9}})
    run = RunDir(tmp_path / "run")
    run.create()
    record, _ = RecordKeeper.open(run.record, "r1", run.root, tmp_path / "c.yaml", {}, "h")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind("inproc://telemetry")
    pub = ctx.socket(zmq.PUB)
    pub.connect("inproc://telemetry")
    while True:  # PUB/SUB: wait until the subscription has reached the publisher
        pub.send(b"sync")
        if sub.poll(50):
            sub.recv()
            break
    while sub.poll(50):
        sub.recv()
    spawner, clock = FakeSpawner(), Clock()
    runner = AttemptRunner(config=config, config_path=tmp_path / "c.yaml", run=run,
                           record=record, spawner=spawner,
                           policy=Policy(config.supervisor, random.Random(0)), env={},
                           command=["worker"], log=structlog.get_logger())
    notifier = FakeNotifier()
    sup = Supervisor(runner=runner, record=record, telemetry=sub, control=None,
                     log=structlog.get_logger(), clock=clock, notifier=notifier,
                     background=InlineJob)
    yield sup, spawner, clock, pub
    pub.close(0)
    sub.close(0)
    ctx.term()


def send(pub, sub_sup, msg) -> None:
    attempt = sub_sup.runner.attempt  # a worker stamps its attempt's token on every message
    if attempt is not None and not msg.token:
        msg = msg.with_token(attempt.token)
    pub.send(msg.to_json())
    assert sub_sup.telemetry.poll(1000)
    sub_sup._tick()


def beat(pid, step, attempt=1):
    return Heartbeat(run_id="r", pid=pid, attempt=attempt, seq=1, time=0.0,
                     phase=Phase.TRAINING, step=step, total_steps=100, last_step_time=0.0,
                     active_mb=1.0, peak_mb=1.0, rss_mb=1.0, dropped=0)


def test_hang_sigterm_then_sigkill_then_restart_from_scratch(rig):
    sup, spawner, clock, pub = rig
    sup.dispatch(Begin())
    assert sup.state is State.STARTING and len(spawner.started) == 1
    argv, proc = spawner.started[0]
    assert argv[:2] == ["worker", "train"] and argv[-2:] == ["--resume", "auto"]
    send(pub, sup, beat(proc.pid, 3))
    assert sup.state is State.TRAINING
    send(pub, sup, beat(proc.pid + 1, 50))  # another pid: ignored
    assert sup.runner.attempt.view.step == 3

    clock.now = 9.9
    sup._tick()
    assert sup.state is State.TRAINING and proc.signals == []
    clock.now = 10.0  # heartbeat_timeout after the last heartbeat
    sup._tick()
    assert sup.state is State.STOPPING and proc.signals == [signal.SIGTERM, signal.SIGCONT]
    clock.now = 14.9
    sup._tick()
    assert signal.SIGKILL not in proc.signals
    clock.now = 15.0  # stop_timeout later: SIGKILL, the process is gone
    sup._tick()
    assert proc.signals[-1] == signal.SIGKILL
    sup._tick()
    assert sup.state is State.BACKING_OFF
    attempt = sup.record.attempts[0]
    assert (attempt.classification, attempt.detected_by) == (
        FailureClass.HANG, Detection.HEARTBEAT_TIMEOUT)
    assert attempt.killed_after_stop_timeout and attempt.detection_latency_s == 10.0

    clock.now = 15.5
    sup._tick()
    assert sup.state is State.BACKING_OFF  # backoff ~1 s (+-20 %)
    clock.now = 16.5
    sup._tick()
    assert sup.state is State.STARTING and len(spawner.started) == 2
    argv = spawner.started[1][0]
    assert "--attempt" in argv and argv[-2:] == ["--resume", "auto"]


def test_crash_is_noticed_on_the_next_tick_and_a_user_stop_while_backing_off_ends_stopped(rig):
    sup, spawner, _, pub = rig
    sup.dispatch(Begin())
    _, proc = spawner.started[0]
    send(pub, sup, StepMetrics(run_id="r", attempt=1, step=1, time=0.0, loss=1.0,
                               grad_norm=1.0, lr=1e-5, tokens=10, tokens_per_sec=5.0,
                               step_seconds=2.0, active_mb=1.0, peak_mb=1.0, rss_mb=1.0))
    proc.returncode = -signal.SIGSEGV
    sup._tick()
    assert sup.state is State.BACKING_OFF
    assert sup.record.attempts[0].signal_name == "SIGSEGV"
    assert sup.status().restart_in_s is not None
    sup.request_stop("control")
    assert sup.state is State.STOPPED and len(spawner.started) == 1


class ManualJob:
    """A checkpoint validation that takes as long as the test says (ManualJob.made[-1].finish())."""

    made: ClassVar[list[ManualJob]] = []

    def __init__(self, work, wake) -> None:
        self.work, self.wake, self._done = work, wake, False
        ManualJob.made.append(self)

    def finish(self) -> None:
        self._done = True
        self.wake()

    def done(self) -> bool:
        return self._done

    def result(self):
        return self.work()


@pytest.fixture
def slow_rig(rig):
    sup = rig[0]
    ManualJob.made = []
    sup.background = ManualJob
    return rig


def test_the_loop_keeps_serving_while_the_checkpoint_is_validated(slow_rig):
    sup, spawner, clock, _ = slow_rig
    notifier = sup.notifier
    sup.dispatch(Begin())
    assert sup.state is State.STARTING and spawner.started == [] and len(ManualJob.made) == 1
    for t in (0.0, 1.0, 2.0, 3.0, 4.0):  # validation takes 4 s: ticks go on
        clock.now = t
        sup._tick()
    assert notifier.sent.count("WATCHDOG=1") == 3  # at 0, 2, 4 s: every half interval (4 s)
    status = sup.status()
    assert (status.state, status.worker_pid, status.phase) == (State.STARTING, None, None)
    ManualJob.made[0].finish()
    sup._tick()
    assert len(spawner.started) == 1 and "READY=1" in notifier.sent
    assert sup.record.record.attempts[0].pid == spawner.started[0][1].pid


def test_a_stop_while_the_first_checkpoint_is_validated_starts_no_worker(slow_rig):
    sup, spawner, _, _ = slow_rig
    sup.dispatch(Begin())
    sup.request_stop("signal")
    assert sup.state is State.STOPPED
    assert sup.record.record.reason == "stop requested while no worker was running"
    ManualJob.made[0].finish()
    sup._tick()
    assert spawner.started == [] and sup.record.attempts == ()


def test_every_state_change_is_told_to_the_service_manager(rig):
    sup, spawner, _, pub = rig
    sup.dispatch(Begin())
    _, proc = spawner.started[0]
    send(pub, sup, beat(proc.pid, 1))
    assert [s for s in sup.notifier.sent if s.startswith("STATUS=")] == [
        "STATUS=training: training started (step 1)"]
    sup.request_stop("control")
    assert sup.notifier.sent[-2:] == ["STOPPING=1", "STATUS=stopping: stop requested (control)"]


def test_a_metrics_batch_is_believed_step_by_step(rig):
    """The worker folds a flush's steps into one message: the supervisor's view moves to the
    batch's last step, and a forged step inside a batch is rejected like a single one."""
    from shared.protocol import StepMetrics, StepMetricsBatch

    sup, spawner, _, pub = rig
    sup.dispatch(Begin())
    proc = spawner.started[0][1]
    send(pub, sup, beat(proc.pid, 0))

    def step(n: int) -> StepMetrics:
        return StepMetrics("r", 1, n, 0.0, 2.0, 1.0, 1e-4, 64, 1.0, 0.01, 1.0, 1.0, 1.0)

    send(pub, sup, StepMetricsBatch.fold([step(n) for n in range(1, 21)]))
    assert sup.runner.attempt.view.step == 20
    assert sup.gate.rejected == 0
    assert sup.record.record.final_step == 20  # the record has the batch's last step
    send(pub, sup, StepMetricsBatch.fold([step(21), step(10**6)]))
    assert sup.runner.attempt.view.step == 21 and sup.gate.rejected == 1
    assert sup.record.record.final_step == 21


def count_ticks(sup: Any) -> list[int]:
    """Count the loop's passes: [n], n growing each time `sup._tick` runs."""
    ticks = [0]
    tick = sup._tick

    def counted() -> None:
        ticks[0] += 1
        tick()

    sup._tick = counted
    return ticks


def test_a_wake_up_does_not_leave_the_loop_spinning(slow_rig):
    """A background job's wake-up byte is read: the loop then sleeps in its poll (at most
    MAX_POLL, 0.5 s) instead of ticking thousands of times a second, and a SIGTERM still
    stops it."""
    import os
    import threading

    sup, _, _, _ = slow_rig
    ticks = count_ticks(sup)
    threading.Timer(0.1, lambda: sup.wake()).start()
    threading.Timer(1.1, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    assert sup.run(Begin()) is State.STOPPED
    assert ticks[0] <= 10, f"{ticks[0]} ticks in ~1 s"
