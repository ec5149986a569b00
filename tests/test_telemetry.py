"""worker/telemetry.py: never blocks training; holds messages until the subscriber is there."""

from __future__ import annotations

import json
import time
from pathlib import Path

import zmq

from shared import protocol as p
from worker.telemetry import LiveStatus, Telemetry


def _metrics(step: int) -> p.StepMetrics:
    return p.StepMetrics("r", 1, step, 0.0, 1.0, 1.0, 1e-3, 10, 1.0, 0.1, 1.0, 1.0, 1.0)


def test_send_never_blocks_without_a_supervisor(tmp_path: Path) -> None:
    t = Telemetry(f"ipc://{tmp_path}/nobody", LiveStatus("r", 1, 10))
    started = time.perf_counter()
    for step in range(20_000):
        t.send(_metrics(step))
    assert time.perf_counter() - started < 2.0
    assert t.dropped >= 20_000 - 10_000  # the bounded queue dropped (and counted) the oldest
    started = time.perf_counter()
    t.close()
    assert time.perf_counter() - started < 3.0


def test_a_late_subscriber_gets_what_was_sent_before_it_arrived(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/late"
    t = Telemetry(endpoint, LiveStatus("r", 1, 10))
    for step in range(1, 4):
        t.send(_metrics(step))
    time.sleep(0.3)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(endpoint)
    got: list[p._Message] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len([m for m in got if isinstance(m, p.StepMetrics)]) < 3:
        if sub.poll(100):
            got.extend(p.decode_all(sub.recv()))
    t.close()
    sub.close(linger=0)
    assert [m.step for m in got if isinstance(m, p.StepMetrics)] == [1, 2, 3]
    assert isinstance(got[0], p.Heartbeat)  # the first heartbeat was held too


def _collect(endpoint: str, t: Telemetry, n: int) -> list[bytes]:
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(endpoint)
    got: list[bytes] = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(got) < n:
        if sub.poll(100):
            got.append(sub.recv())
    sub.close(linger=0)
    return got


def test_every_message_carries_the_attempts_token_from_the_environment(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(p.TOKEN_ENV, "5f" * 16)
    endpoint = f"ipc://{tmp_path}/token"
    t = Telemetry(endpoint, LiveStatus("r", 1, 10))
    t.send(_metrics(1))
    t.send(p.WorkerStopping("r", 1, 1, 0, "completed", ""))
    got = [m for raw in _collect(endpoint, t, 3) for m in p.decode_all(raw)]
    t.close()
    kinds = {type(m).__name__ for m in got}
    assert {"Heartbeat", "StepMetrics", "WorkerStopping"} <= kinds
    assert {m.token for m in got} == {"5f" * 16}  # type: ignore[union-attr]


def test_without_a_supervisor_the_messages_are_the_version_1_ones(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """No token in the environment (a worker started by hand): no "token" key at all."""
    monkeypatch.delenv(p.TOKEN_ENV, raising=False)
    endpoint = f"ipc://{tmp_path}/plain"
    t = Telemetry(endpoint, LiveStatus("r", 1, 10))
    t.send(_metrics(1))
    raws = _collect(endpoint, t, 2)
    t.close()
    assert raws and all(b'"token"' not in raw for raw in raws)
    assert all(b'"v":1' in raw for raw in raws)


def test_the_steps_of_one_flush_go_out_as_one_metrics_batch(tmp_path: Path,
                                                            monkeypatch) -> None:
    """At > 100 steps/s a flush holds several steps: one message carries them all, so the
    supervisor receives and parses one message per flush, not one per step."""
    monkeypatch.setenv(p.TOKEN_ENV, "ab" * 16)
    endpoint = f"ipc://{tmp_path}/batch"
    t = Telemetry(endpoint, LiveStatus("r", 1, 200))
    for step in range(1, 101):  # queued before anyone subscribes: one flush
        t.send(_metrics(step))
    t.send(p.WorkerStopping("r", 1, 100, 0, "completed", ""))
    raws = _collect(endpoint, t, 4)
    t.close()
    kinds = [json.loads(raw)["type"] for raw in raws]
    assert kinds[:4] == ["heartbeat", "metrics_batch", "metrics_batch", "stopping"]
    steps = [m for raw in raws for m in p.decode_all(raw) if isinstance(m, p.StepMetrics)]
    assert [m.step for m in steps] == list(range(1, 101))  # 64 + 36: at most 64 a message
    assert {m.token for m in steps} == {"ab" * 16}
