"""supervisor/daemon/telemetry_gate.py and the loop's ingest boundary: only the running
attempt's messages, carrying its token, with steps that move forward and stay within the
run, are believed; anything else is counted and ignored; a message whose processing raises
is counted and logged and the supervisor goes on. Issue 12: a well-formed metrics message
claiming step 10**9 became the finished run's final_step and high_water_step."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from shared.layout import RunDir
from shared.protocol import (
    TOKEN_ENV,
    CheckpointSaved,
    EvalResult,
    Heartbeat,
    Phase,
    StepMetrics,
    WorkerStopping,
)
from supervisor.daemon.state import Begin, State
from supervisor.daemon.telemetry_gate import TelemetryGate, new_token
from tests.supervisor_support import events, record, start_daemon, wait_for, write_config
from tests.test_loop import FakeSpawner, beat, rig, send  # noqa: F401  (rig: a fixture)

BIG = 10**9


def metrics(step: int, attempt: int = 1, token: str = "") -> StepMetrics:
    return StepMetrics(run_id="r", attempt=attempt, step=step, time=0.0, loss=1.0,
                       grad_norm=1.0, lr=1e-5, tokens=10, tokens_per_sec=5.0,
                       step_seconds=0.1, active_mb=1.0, peak_mb=1.0, rss_mb=1.0, token=token)


def heartbeat(step: int, total: int = 40, pid: int = 7, attempt: int = 1,
              token: str = "") -> Heartbeat:
    return Heartbeat(run_id="r", pid=pid, attempt=attempt, seq=1, time=0.0,
                     phase=Phase.TRAINING, step=step, total_steps=total, last_step_time=0.0,
                     active_mb=1.0, peak_mb=1.0, rss_mb=1.0, dropped=0, token=token)


# ---- the gate ----------------------------------------------------------------------------


@pytest.fixture
def gate() -> tuple[TelemetryGate, str]:
    g, token = TelemetryGate(), new_token()
    g.begin(attempt=1, pid=7, token=token, total_steps=40)
    return g, token


def test_tokens_are_128_random_bits() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100 and all(len(t) == 32 and int(t, 16) >= 0 for t in tokens)


def test_only_the_running_attempts_token_is_believed(gate) -> None:
    g, token = gate
    assert g.admit(metrics(5, token=token))
    assert not g.admit(metrics(6))
    assert not g.admit(metrics(6, token=new_token()))
    assert not g.admit(metrics(6, token=token[:-1]))
    assert (g.accepted, g.rejected) == (1, 3)
    assert g.first_reason == "StepMetrics with no token (attempt 1 running)"
    assert g.last_reason == "StepMetrics with a token of no attempt (attempt 1 running)"


def test_an_ended_attempts_last_words_are_late_not_rejected(gate) -> None:
    g, token = gate
    g.end()
    assert not g.admit(metrics(6, token=token)) and (g.late, g.rejected) == (1, 0)
    g.begin(attempt=2, pid=8, token=new_token(), total_steps=40)
    assert not g.admit(heartbeat(6, token=token)) and (g.late, g.rejected) == (2, 0)
    assert not g.admit(heartbeat(6, pid=8, attempt=2)) and g.rejected == 1


@pytest.mark.parametrize(("make", "reason"), [
    (lambda t: metrics(BIG, token=t), "StepMetrics: step 1000000000 outside 0..40"),
    (lambda t: metrics(41, token=t), "StepMetrics: step 41 outside 0..40"),
    (lambda t: metrics(-1, token=t), "StepMetrics: step -1 outside 0..40"),
    (lambda t: heartbeat(BIG, total=40, token=t), "Heartbeat: step 1000000000 outside 0..40"),
    (lambda t: heartbeat(3, total=0, token=t), "heartbeat: total_steps 0 outside 1..40"),
    (lambda t: heartbeat(3, total=BIG, token=t), "heartbeat: total_steps 1000000000 outside"),
    (lambda t: heartbeat(3, pid=99, token=t), "heartbeat: pid 99, the worker is pid 7"),
    (lambda t: metrics(3, attempt=2, token=t), "StepMetrics: attempt 2 with the token of"),
    (lambda t: EvalResult("r", 1, 20, 1.0, 1.0, 30, 0.1, token=t), "eval: best_step 30 after"),
    (lambda t: WorkerStopping("r", 1, 20, 22, "non_finite", "", 25, token=t),
     "stopping: first_bad_step 25 beyond the step after its step 20"),
    (lambda t: CheckpointSaved("r", 1, BIG, "/x", 0.1, 1, token=t), "CheckpointSaved: step"),
])
def test_a_token_is_not_enough(gate, make, reason: str) -> None:
    """The worker's own token with an impossible step, pid or attempt: rejected too."""
    g, token = gate
    assert not g.admit(make(token))
    assert g.rejected == 1 and g.first_reason.startswith(reason)


def test_a_worker_stopping_in_the_step_it_computes_is_believed(gate) -> None:
    """A non-finite loss at step 21 is reported by a worker whose last finished step is 20."""
    g, token = gate
    assert g.admit(WorkerStopping("r", 1, 20, 22, "non_finite", "", 21, token=token))


def test_steps_only_move_forward_per_kind_of_message(gate) -> None:
    g, token = gate
    assert g.admit(metrics(10, token=token)) and g.admit(metrics(10, token=token))
    assert not g.admit(metrics(9, token=token))
    assert g.first_reason == "StepMetrics: step 9 after step 10 (steps only move forward)"
    # Heartbeats come from another thread: one may say step 8 after metrics of step 10.
    assert g.admit(heartbeat(8, token=token)) and g.admit(heartbeat(12, token=token))
    assert not g.admit(heartbeat(11, token=token))
    assert g.admit(CheckpointSaved("r", 1, 10, "/x", 0.1, 1, token=token))
    assert g.rejected == 2


def test_a_heartbeat_may_not_raise_the_total(gate) -> None:
    g, token = gate
    assert not g.admit(heartbeat(50, total=80, token=token))
    assert g.first_reason == "heartbeat: total_steps 80 outside 1..40 (the run's iters)"
    assert g.admit(heartbeat(30, total=30, token=token))  # a lower total is the worker's own


# ---- the loop (fakes: tests/test_loop.py's rig) -----------------------------------------


class RecordingSpawner(FakeSpawner):
    def __init__(self) -> None:
        super().__init__()
        self.envs: list[dict[str, str]] = []

    def spawn(self, argv, env, output):  # type: ignore[no-untyped-def]
        self.envs.append(dict(env))
        return super().spawn(argv, env, output)


class ListLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **kw: self.lines.append((level, event, kw))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [kw for _, e, kw in self.lines if e == event]


@pytest.fixture
def loop(rig):  # noqa: F811
    sup, _, clock, pub = rig
    spawner = RecordingSpawner()
    sup.runner.spawner = spawner
    sup.log = ListLog()
    sup.dispatch(Begin())
    return sup, spawner, clock, pub


def _raw(pub, sup, msg) -> None:
    """Publish exactly `msg` (no token stamped) and let the loop take it in."""
    pub.send(msg.to_json())
    assert sup.telemetry.poll(1000)
    sup._tick()


def test_each_attempt_gets_a_new_token_in_its_environment_never_on_its_command_line(loop):
    sup, spawner, clock, pub = loop
    proc = spawner.started[0][1]
    token = spawner.envs[0][TOKEN_ENV]
    assert len(token) == 32 and token == sup.runner.attempt.token
    assert not any(token in arg for arg in spawner.started[0][0])
    send(pub, sup, beat(proc.pid, 3))
    proc.returncode = -9
    sup._tick()
    clock.now = 2.0
    sup._tick()  # backoff elapsed: attempt 2
    assert len(spawner.envs) == 2 and spawner.envs[1][TOKEN_ENV] not in ("", token)


def test_a_forged_step_changes_nothing_and_is_counted_and_logged_once_a_minute(loop):
    sup, spawner, clock, pub = loop
    proc = spawner.started[0][1]
    send(pub, sup, beat(proc.pid, 3))  # the worker, with its token
    assert sup.state is State.TRAINING
    for _ in range(5):
        _raw(pub, sup, metrics(BIG))
        _raw(pub, sup, beat(proc.pid, BIG))
    view = sup.runner.attempt.view
    assert view.step == 3 and sup.record.record.final_step == 3
    assert sup.status().telemetry_rejected == 10
    logged = sup.log.named("telemetry_rejected")
    assert len(logged) == 1 and logged[0]["count"] == 1
    assert logged[0]["first_reason"] == "StepMetrics with no token (attempt 1 running)"
    clock.now = 60.0
    _raw(pub, sup, metrics(BIG))
    assert [e["new"] for e in sup.log.named("telemetry_rejected")] == [1, 10]
    send(pub, sup, metrics(4))
    proc.returncode = 0
    sup._tick()
    assert sup.record.record.final_step == 4 and sup.record.attempts[0].end_step == 4


def test_garbage_on_the_telemetry_socket_is_counted_too(loop):
    sup, _, _, pub = loop
    pub.send(b"[" * 60000)
    assert sup.telemetry.poll(1000)
    sup._tick()
    assert sup.gate.rejected == 1 and "nested deeper" in sup.gate.first_reason


def test_a_message_whose_processing_raises_is_counted_and_logged_and_the_loop_goes_on(
        loop, monkeypatch):
    sup, spawner, _, pub = loop
    proc = spawner.started[0][1]

    def broken(msg: Any) -> None:
        raise RuntimeError("a bug in processing")

    monkeypatch.setattr(sup.runner, "on_message", broken)
    for step in (1, 2, 3):
        send(pub, sup, metrics(step))  # stamped with the token: believed, then raises
    assert sup.ingest_failures == 3
    failed = sup.log.named("telemetry_ingest_failed")
    assert len(failed) == 1 and failed[0]["exc_info"] is True and failed[0]["count"] == 1
    monkeypatch.undo()
    proc.returncode = 0  # the loop still notices the worker's exit
    sup._tick()
    assert sup.state is not State.STARTING and sup.record.attempts[0].ended is not None


# ---- a real supervisor and a forging publisher ------------------------------------------


def _worker_pid(run: RunDir) -> int | None:
    try:
        return int((record(run.root).get("worker") or {}).get("pid") or 0) or None
    except (OSError, ValueError):  # not written yet
        return None


def _forge(run: RunDir, daemon: Any, with_token: bool) -> int:
    """Publish forged telemetry until the daemon exits: metrics and heartbeats claiming step
    10**9 as attempt 1 (with the worker's pid); `with_token`: with the worker's own token,
    read from /proc/<pid>/environ, and steps that also go backwards."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    wait_for(lambda: Path(run.telemetry_endpoint.removeprefix("ipc://")).exists())
    pub.connect(run.telemetry_endpoint)
    pid = wait_for(lambda: _worker_pid(run))
    token = ""
    if with_token:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        token = next(e.split(b"=", 1)[1].decode() for e in env
                     if e.startswith(TOKEN_ENV.encode() + b"="))
    sent = 0
    while daemon.poll() is None:
        for msg in (metrics(BIG, token=token), heartbeat(BIG, total=BIG, pid=pid, token=token),
                    metrics(1, token=token), heartbeat(1, total=60, pid=pid, token=token)):
            pub.send(msg.to_json())
            sent += 1
        time.sleep(0.01)
    pub.close(0)
    ctx.term()
    return sent


@pytest.mark.parametrize("with_token", [False, pytest.param(True, marks=pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads the token from /proc"))])
def test_a_forging_publisher_cannot_move_a_real_run(tmp_path: Path, with_token: bool) -> None:
    config = write_config(tmp_path, iters=60)
    run = RunDir(tmp_path / "run")
    daemon = start_daemon(config, run.root, env={"FAKE_STEP_SECONDS": "0.04"})
    try:
        sent = _forge(run, daemon, with_token)
        assert daemon.wait(timeout=60) == 0, daemon.stderr.read().decode()[-2000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
    rec = record(run.root)
    assert rec["state"] == "finished" and sent > 20
    assert (rec["final_step"], rec["high_water_step"]) == (60, 60)
    assert [a["end_step"] for a in rec["attempts"]] == [60]
    rejected = events(run.root, "telemetry_rejected")
    assert rejected and rejected[0]["count"] >= 1
    first = rejected[0]["first_reason"]  # which forged message arrived first may vary
    assert first.startswith(("StepMetrics: step 1000000000 outside 0..60",
                             "heartbeat: total_steps 1000000000 outside 1..60",
                             "StepMetrics: step 1 after", "Heartbeat: step 1 after")
                            if with_token else ("StepMetrics with no token",
                                                "Heartbeat with no token")), first
    # Every forged message up to the worker's exit is rejected (later ones: the run is over)
    assert events(run.root, "run_ended")[0]["telemetry_rejected"] >= 10
    assert os.environ.get(TOKEN_ENV) is None  # the test process never had one
