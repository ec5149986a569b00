"""The supervisor loop's intake of metrics batches (supervisor/daemon/loop.py `_on_telemetry`
with shared/step_columns.py, TelemetryGate.admit_steps, AttemptView.update_steps): the view
and the run record come out as with the per-step path, every hostile batch is still refused,
counted and logged, and a step costs a fraction of the per-step path's CPU.

The loop runs with the fakes of tests/test_loop.py (in-process ZeroMQ, fake clock, fake
worker process); the per-step path is the same loop with the column reader switched off.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import pytest
import structlog

from shared import step_columns
from shared.protocol import StepMetrics, StepMetricsBatch
from supervisor.daemon.state import Begin, State
from tests.test_loop import beat, count_ticks, rig, send  # noqa: F401  (rig: a fixture)
from tests.test_telemetry_forgery import ListLog


@pytest.fixture
def loop(rig):  # noqa: F811
    sup, spawner, clock, pub = rig
    sup.log = ListLog()
    sup.dispatch(Begin())
    proc = spawner.started[0][1]
    send(pub, sup, beat(proc.pid, 0))  # training (an attempt's first steps go step by step)
    assert sup.state is State.TRAINING
    return sup, clock, pub


def step(n: int, loss: float = 2.0, tokens: int = 64, seconds: float = 0.01,
         active: float = 10.0, peak: float = 11.0, attempt: int = 1) -> StepMetrics:
    return StepMetrics("r", attempt, n, 1.7e9 + n, loss, 1.0, 1e-4, tokens, 6400.0, seconds,
                       active, peak, 100.0, data_position=n + 1, cache_mb=3.0,
                       footprint_mb=0.0)


def per_step_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop as before the column reader: every batch decoded and unfolded step by step."""
    monkeypatch.setattr(step_columns, "parse", lambda raw: None)


def _view(sup: Any) -> dict[str, Any]:
    v = sup.runner.attempt.view
    return {k: getattr(v, k) for k in ("step", "tokens", "step_seconds", "last_loss",
                                       "active_mb", "peak_mlx_mb", "cache_mb", "footprint_mb",
                                       "last_seen", "progress_at", "first_step_at")}


def _feed(sup: Any, clock: Any, pub: Any) -> None:
    """Three flushes: 7 steps, then 2 with a forged one among them, then 3 with a peak."""
    clock.now = 1.0
    send(pub, sup, StepMetricsBatch.fold([step(n) for n in range(1, 8)]))
    clock.now = 2.0
    send(pub, sup, StepMetricsBatch.fold([step(8, loss=1.5), step(10**6), step(9, loss=1.25,
                                                                               tokens=32)]))
    clock.now = 3.0
    send(pub, sup, StepMetricsBatch.fold([step(10, active=30.0, peak=20.0), step(11),
                                          step(12, loss=math.nan, seconds=0.25)]))


def test_the_view_and_the_record_are_what_the_steps_say(loop) -> None:
    """Literals: 11 believed steps of 64 tokens and one of 32, their seconds summed, the
    last loss (NaN), the highest MLX memory seen (30 MB: an active reading above the peak),
    the forged step 10**6 refused and counted."""
    sup, clock, pub = loop
    _feed(sup, clock, pub)
    v = _view(sup)
    assert v["step"] == 12 and v["tokens"] == 11 * 64 + 32
    assert v["step_seconds"] == pytest.approx(11 * 0.01 + 0.25)
    assert math.isnan(v["last_loss"]) and v["peak_mlx_mb"] == 30.0
    assert (v["active_mb"], v["cache_mb"]) == (10.0, 3.0)
    assert (v["last_seen"], v["progress_at"], v["first_step_at"]) == (3.0, 3.0, 1.0)
    assert sup.gate.rejected == 1 and sup.gate.accepted == 1 + 12
    assert sup.gate.first_reason == "StepMetrics: step 1000000 outside 0..100 (total steps)"
    assert sup.record.record.final_step == 12 and sup.record.record.total_steps == 100
    clock.now = 10.0
    sup._tick()  # the progress write
    saved = json.loads(sup.runner.run.record.read_text())
    assert saved["final_step"] == 12 and saved["attempts"][0]["end_step"] == 12


def test_the_view_and_the_record_are_those_of_the_per_step_path(rig, monkeypatch) -> None:  # noqa: F811
    """The same telemetry through the loop with the column reader switched off (every step
    decoded, gated and folded in as its own StepMetrics) gives the same view, counts and
    record."""
    sup, spawner, clock, pub = rig
    sup.log = ListLog()
    sup.dispatch(Begin())
    send(pub, sup, beat(spawner.started[0][1].pid, 0))
    _feed(sup, clock, pub)
    columns = (repr(_view(sup)), sup.gate.accepted, sup.gate.rejected, sup.gate.first_reason,
               sup.record.record.final_step)
    sup.runner.attempt.view.__init__(1, spawner.started[0][1].pid, 0.0, 0)  # start over
    sup.gate.begin(1, spawner.started[0][1].pid, sup.runner.attempt.token, 100)
    sup.gate.accepted = sup.gate.rejected = 0
    sup.gate.first_reason = ""
    sup.record.update(final_step=0, save=False)
    per_step_path(monkeypatch)
    send(pub, sup, beat(spawner.started[0][1].pid, 0))
    _feed(sup, clock, pub)
    assert (repr(_view(sup)), sup.gate.accepted, sup.gate.rejected, sup.gate.first_reason,
            sup.record.record.final_step) == columns


def _raw_batch(rows: list[dict[str, Any]], **envelope: Any) -> bytes:
    return json.dumps({"type": "metrics_batch", "v": 1, "run_id": "r", "attempt": 1,
                       "steps": rows, **envelope}).encode()


def test_hostile_batches_are_refused_counted_and_logged(loop) -> None:
    """Malformed batches are refused whole, with the general decoder's reason; a batch with
    another token is refused row by row (as the steps it stands for); nothing moves the run."""
    sup, _clock, pub = loop
    token = sup.runner.attempt.token
    good = json.loads(StepMetricsBatch.fold([step(1)]).with_token(token).to_json())["steps"][0]
    hostile = [
        _raw_batch([good, {**good, "step": 2, "loss": "x"}], token=token),
        _raw_batch([{**good, "step": True}], token=token),
        _raw_batch([{**good, "step": 2**63}], token=token),
        _raw_batch([{**good, "extra": 1}], token=token),
        _raw_batch([good] * 65, token=token),
        _raw_batch([good], token=token, attempt="1"),
        _raw_batch([{**good, "step": 50}, {**good, "step": 51}], token="f" * 32),
    ]
    for raw in hostile:
        pub.send(raw)
        assert sup.telemetry.poll(1000)
        sup._tick()
    assert sup.runner.attempt.view.step == 0 and sup.record.record.final_step == 0
    assert sup.gate.rejected == 6 + 2 and sup.status().telemetry_rejected == 8
    assert sup.gate.first_reason == (
        "not a message: StepMetricsBatch.steps[1].loss: expected a number, got 'x'")
    assert sup.gate.last_reason == "StepMetrics with a token of no attempt (attempt 1 running)"
    logged = sup.log.named("telemetry_rejected")
    assert len(logged) == 1 and logged[0]["first_reason"] == sup.gate.first_reason
    send(pub, sup, StepMetricsBatch.fold([step(1), step(2)]))  # the worker's own: believed
    assert sup.runner.attempt.view.step == 2 and sup.gate.rejected == 8


def test_an_ended_attempts_last_batch_is_late_not_rejected(loop) -> None:
    sup, _clock, pub = loop
    token = sup.runner.attempt.token
    sup.runner.attempt.proc.returncode = -9
    sup._tick()
    assert sup.state is State.BACKING_OFF
    pub.send(StepMetricsBatch.fold([step(1), step(2), step(3)]).with_token(token).to_json())
    assert sup.telemetry.poll(1000)
    sup._tick()
    assert (sup.gate.late, sup.gate.rejected) == (3, 0)


def test_an_older_workers_single_metrics_messages_still_count(loop) -> None:
    sup, _clock, pub = loop
    for n in (1, 2, 3):
        send(pub, sup, step(n, tokens=10))
    assert sup.runner.attempt.view.step == 3 and sup.runner.attempt.view.tokens == 30
    assert sup.record.record.final_step == 3 and sup.gate.rejected == 0


def _cpu_per_step(sup: Any, raws: list[bytes], rows: int) -> float:
    t = time.process_time()
    for raw in raws:
        sup._on_telemetry(raw)
        sup._fold_steps()
    return (time.process_time() - t) / (len(raws) * rows)


def test_a_step_of_a_flush_costs_a_fraction_of_the_per_step_path(loop, monkeypatch) -> None:
    """CPU per step of 7-step batches (a 50 ms flush at ~150 steps/s), column reader vs per
    step path, interleaved in this process: the ratio, not the load of the machine, decides
    (measured ~0.25; the bound leaves room for noise)."""
    sup, _, _ = loop
    token = sup.runner.attempt.token
    n = [0]

    def batch() -> bytes:
        n[0] += 7
        return StepMetricsBatch.fold([step(s) for s in range(n[0] - 6, n[0] + 1)]).with_token(
            token).to_json()

    sup.runner.attempt.view.total_steps = sup.gate.current.total_steps = 10**9
    columns, per_step = [], []
    for _ in range(5):
        columns.append(_cpu_per_step(sup, [batch() for _ in range(60)], 7))
        with monkeypatch.context() as m:
            per_step_path(m)
            per_step.append(_cpu_per_step(sup, [batch() for _ in range(60)], 7))
    assert sup.gate.rejected == 0 and sup.runner.attempt.view.step == n[0]
    assert min(columns) < 0.5 * min(per_step), (columns, per_step)


def test_one_wake_up_takes_in_several_flushes(rig) -> None:  # noqa: F811
    """The real loop (`run`) with a worker flushing a batch every 50 ms: after an intake the
    telemetry waits up to 0.25 s (loop.py TELEMETRY_EVERY), so ~1.2 s of flushes cost a
    handful of passes, not one each — and every step still arrives, in order."""
    import threading

    sup, _, _, pub = rig
    ticks = count_ticks(sup)

    def worker() -> None:
        while sup.runner.attempt is None:
            time.sleep(0.01)
        attempt = sup.runner.attempt
        pub.send(beat(attempt.pid, 0).with_token(attempt.token).to_json())
        for k in range(24):
            time.sleep(0.05)
            pub.send(StepMetricsBatch.fold([step(4 * k + i) for i in range(1, 5)]).with_token(
                attempt.token).to_json())
        time.sleep(0.3)
        steps.append(sup.runner.attempt.view.step)
        attempt.proc.returncode = 0  # the worker is done
        sup.wake()

    steps: list[int] = []
    thread = threading.Thread(target=worker)
    thread.start()
    final = sup.run(Begin())
    thread.join()
    assert final.is_final and steps == [96] and sup.gate.rejected == 0  # the run's iters: 100
    assert sup.gate.accepted == 1 + 96
    assert ticks[0] <= 12, f"{ticks[0]} passes for 25 messages in ~1.5 s"


def test_the_intake_benchmark_measures_both_paths() -> None:
    """benchmarks/intake_cost.py (part 2 of benchmarks/run.py) runs the real loop both ways
    and finds no rejection; at 50 steps a message the column path is the cheaper one."""
    from benchmarks import intake_cost

    before = structlog.get_config()
    try:
        r = intake_cost.measure(messages=20, repeats=1)
    finally:  # the benchmark configures structlog for itself; the next test gets it back
        structlog.configure(**before)
    assert sorted(r["rows"]) == [1, 7, 50]
    fifty = r["rows"][50]["whole_per_step"]
    assert 0 < fifty["after"] < fifty["before"]
    assert set(r["loop"]) == {"idle pass (_tick, nothing waiting)",
                              "memory sample (psutil, every sample_interval)",
                              "progress write of run.json (every 2 s)"}
