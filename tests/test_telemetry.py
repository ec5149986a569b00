"""worker/telemetry.py: never blocks training; holds messages until the subscriber is there."""

from __future__ import annotations

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
            got.append(p.decode(sub.recv()))
    t.close()
    sub.close(linger=0)
    assert [m.step for m in got if isinstance(m, p.StepMetrics)] == [1, 2, 3]
    assert isinstance(got[0], p.Heartbeat)  # the first heartbeat was held too
