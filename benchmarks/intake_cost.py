"""Part 2a: what one telemetry message costs the supervisor, per message and per step.

    python -m benchmarks.intake_cost            # prints the table (~20 s)

A real supervisor loop (supervisor/daemon/loop.py `Supervisor`, its real gate, view, run
record on disk and AttemptRunner; only the worker process is a stand-in that never exits)
takes in metrics_batch messages of 1, 7 (a 50 ms flush at ~150 steps/s) and 50 rows, as the
worker's sender writes them (StepMetricsBatch.to_json with the attempt's token), every
step new. Measured with `time.process_time` (this process's CPU, not wall time: the machine
is shared), the best of 5 repeats of N messages, the two ways interleaved in each repeat:

- before: the per-step path — `protocol.decode_all` (records.build per row, a StepMetrics
  per step), `TelemetryGate.admit` and `AttemptView.update` per step, the record once per
  batch (the loop with the column reader switched off: what ran before);
- after: the column reader (shared/step_columns.py `parse`), `TelemetryGate.admit_steps`,
  `AttemptView.update_steps`, the record once per batch.

Both are broken down into decode + validate (bytes -> believed values) and the rest (gate,
view, record), and the whole `_on_telemetry` is timed too. Beside them, what the loop does
per pass or per timer whatever arrives: an idle pass (`_tick` with nothing waiting), the
memory sample (psutil, every `sample_interval`), the progress write of run.json (every
2 s while steps arrive) — each per call and per second at its rate.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROWS = (1, 7, 50)


class _Process:
    """A worker that never exits (the loop polls it every pass)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        return None

    def signal(self, sig: int) -> None:
        pass

    def signal_group(self, sig: int) -> None:
        pass


class _Spawner:
    def __init__(self, pid: int) -> None:
        self.pid = pid

    def spawn(self, argv: list[str], env: dict[str, str], output: Path) -> _Process:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.touch()
        return _Process(self.pid)


class _Notifier:
    def ready(self) -> bool:
        return True

    def watchdog(self) -> bool:
        return True

    def stopping(self) -> bool:
        return True

    def status(self, text: str) -> bool:
        return True

    def watchdog_interval(self) -> float | None:
        return None


def _supervisor(tmp: Path) -> Any:
    """A Supervisor in the training state with attempt 1 running (this process stands in
    for its worker: memory samples read a real process)."""
    import os

    import structlog
    import zmq

    from shared import protocol as p
    from shared.config import resolve
    from shared.layout import RunDir
    from supervisor.daemon.checkpoint_choice import InlineJob
    from supervisor.daemon.loop import Supervisor
    from supervisor.daemon.policy import Policy
    from supervisor.daemon.record import RecordKeeper
    from supervisor.daemon.runner import AttemptRunner
    from supervisor.daemon.state import Begin

    # Log calls cost what the loop's calls cost, but go nowhere: no processors (a previous
    # configuration in this process, e.g. a test's, may name stdlib ones a ReturnLogger lacks).
    structlog.configure(processors=[], logger_factory=structlog.ReturnLoggerFactory(),
                        wrapper_class=structlog.BoundLogger, cache_logger_on_first_use=False)
    config = resolve({"model": "m", "data": "d", "iters": 10**9,
                      "supervisor": {"sample_interval": 1e9}})
    run = RunDir(tmp / "run")
    run.create()
    record, _ = RecordKeeper.open(run.record, "r1", run.root, tmp / "c.yaml", {}, "h")
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.bind(f"ipc://{tmp}/telemetry")
    runner = AttemptRunner(config=config, config_path=tmp / "c.yaml", run=run, record=record,
                           spawner=_Spawner(os.getpid()),
                           policy=Policy(config.supervisor, random.Random(0)), env={},
                           command=["worker"], log=structlog.get_logger())
    sup = Supervisor(runner=runner, record=record, telemetry=sub, control=None,
                     log=structlog.get_logger(), notifier=_Notifier(), background=InlineJob)
    sup.dispatch(Begin())
    heartbeat = p.Heartbeat("r1", os.getpid(), 1, 1, time.time(), p.Phase.TRAINING, 0, 10**9,
                            0.0, 10.0, 10.0, 100.0, 0, token=sup.runner.attempt.token)
    sup._on_telemetry(heartbeat.to_json())
    return sup


class _Steps:
    """Metrics batches as the worker's sender writes them, every step new."""

    def __init__(self, token: str) -> None:
        self.token, self.step = token, 0

    def batch(self, rows: int) -> bytes:
        from shared import protocol as p

        ms = []
        for _ in range(rows):
            self.step += 1
            s = self.step
            ms.append(p.StepMetrics("r1", 1, s, 1.7e9 + s * 0.007, 2.31 - s * 1e-6, 0.82,
                                    1e-5, 132, 18000.5, 0.0071, 12.0, 14.0, 120.3,
                                    data_position=s + 1, cache_mb=3.0, token=self.token))
        return p.StepMetricsBatch.fold(ms).to_json()


def _cpu(fn: Callable[[], Any], calls: int) -> float:
    t = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - t) / calls


def measure(messages: int = 300, repeats: int = 5) -> dict[str, Any]:
    """{"rows": {n: {stage: {"before": us, "after": us}}}, "loop": {item: us}}: CPU
    microseconds per message (stages: decode, rest, whole) and per step (whole_per_step)."""
    import os

    from shared import protocol as p
    from shared import step_columns
    from supervisor.daemon import memory

    out: dict[str, Any] = {"rows": {}, "loop": {}}
    with tempfile.TemporaryDirectory() as d:
        sup = _supervisor(Path(d))
        steps = _Steps(sup.runner.attempt.token)
        gate, view, runner = sup.gate, sup.runner.attempt.view, sup.runner
        parse = step_columns.parse

        def per_step_rest(msgs: list[Any]) -> None:  # what the loop did per step, before
            believed = [m for m in msgs if gate.admit(m) and view.accepts(m)
                        and (view.update(m, 0.0) or True)]
            if believed:
                runner.on_message(believed[-1])

        def columns_rest(cols: Any) -> None:  # the record once a pass: here once a message
            rows = gate.admit_steps(cols)
            view.update_steps(cols, rows, 0.0)
            runner.on_message(cols.row(rows[-1]))

        def off(raw: bytes) -> None:
            return None

        def take(raw: bytes) -> None:  # what _take_telemetry does with one message
            sup._on_telemetry(raw)
            sup._fold_steps()

        for n in ROWS:
            count = max(20, messages * 7 // n // 2)
            best: dict[str, dict[str, float]] = {k: {"before": 1e9, "after": 1e9}
                                                 for k in ("decode", "rest", "whole")}
            for _ in range(repeats):
                raws = [steps.batch(n) for _ in range(count)]
                best["decode"]["before"] = min(best["decode"]["before"], _cpu_each(
                    p.decode_all, raws))
                best["decode"]["after"] = min(best["decode"]["after"], _cpu_each(parse, raws))
                decoded = [p.decode_all(raw) for raw in raws]
                best["rest"]["before"] = min(best["rest"]["before"],
                                             _cpu_each(per_step_rest, decoded))
                cols = [parse(raw) for raw in (steps.batch(n) for _ in range(count))]
                best["rest"]["after"] = min(best["rest"]["after"], _cpu_each(columns_rest, cols))
                raws = [steps.batch(n) for _ in range(count)]
                step_columns.parse = off  # the loop as before: every batch step by step
                try:
                    best["whole"]["before"] = min(best["whole"]["before"],
                                                  _cpu_each(take, raws))
                finally:
                    step_columns.parse = parse
                raws = [steps.batch(n) for _ in range(count)]
                best["whole"]["after"] = min(best["whole"]["after"],
                                             _cpu_each(take, raws))
            if gate.rejected:
                raise RuntimeError(f"intake_cost: {gate.rejected} messages rejected "
                                   f"({gate.first_reason})")
            row = {k: {w: v * 1e6 for w, v in ba.items()} for k, ba in best.items()}
            row["whole_per_step"] = {w: v / n for w, v in row["whole"].items()}
            out["rows"][n] = row
        loop = out["loop"]
        loop["idle pass (_tick, nothing waiting)"] = min(
            _cpu(sup._tick, 200) for _ in range(repeats)) * 1e6
        pid = os.getpid()
        loop["memory sample (psutil, every sample_interval)"] = min(
            _cpu(lambda: memory.sample(pid, 0.0, 0, 0.0), 20) for _ in range(repeats)) * 1e6
        loop["progress write of run.json (every 2 s)"] = min(
            _cpu(sup.runner.save_progress, 20) for _ in range(repeats)) * 1e6
        sup.telemetry.close(0)
    return out


def _cpu_each(fn: Callable[[Any], Any], items: list[Any]) -> float:
    t = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - t) / len(items)


def rows(res: Any, r: dict[str, Any]) -> None:
    """One row per batch size (CPU per step, before -> after) and per loop chore."""
    for n, row in r["rows"].items():
        w, dec, rest = row["whole_per_step"], row["decode"], row["rest"]
        res.add("2 supervision", f"intake: CPU per step of a {n}-step metrics_batch",
                f"{w['after']:.1f} us", f"{w['before']:.1f} us before",
                f"{w['before'] / w['after']:.1f}x", "", None,
                f"per message {row['whole']['after']:.0f} us (before {row['whole']['before']:.0f}"
                f"): decode + validate {dec['after']:.0f} us (before {dec['before']:.0f}), gate + "
                f"view + record {rest['after']:.0f} us (before {rest['before']:.0f}); best of 5, "
                "in process, interleaved")
    for item, us in r["loop"].items():
        res.add("2 supervision", f"loop: {item}", f"{us:.0f} us", "", "", "", None,
                "CPU per call, best of 5, in process")
    res.raw["intake_cost_us"] = r


def main() -> None:
    r = measure()
    print(f"{'rows':>5} {'per step before':>16} {'after':>8} {'x':>5}   per message: decode "
          "before/after, rest before/after, whole before/after (us CPU)")
    for n, row in r["rows"].items():
        w = row["whole_per_step"]
        print(f"{n:5d} {w['before']:16.1f} {w['after']:8.1f} {w['before'] / w['after']:5.1f}   "
              + ", ".join(f"{row[k]['before']:.0f}/{row[k]['after']:.0f}"
                          for k in ("decode", "rest", "whole")))
    for item, us in r["loop"].items():
        print(f"{item}: {us:.0f} us")


if __name__ == "__main__":
    main()
