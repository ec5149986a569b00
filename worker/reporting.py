"""How the training loop reports: one interface, several sinks.

The loop calls a `Reporter`; it never prints, logs or sends directly. `RunReporter` writes
the structlog events, the per-step metrics file and the progress line; `TelemetryReporter`
publishes to the supervisor; `FanOut` combines them. Tests pass a recording fake.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Protocol, TextIO

import structlog

from shared import protocol as p
from shared.progress import Progress
from worker.telemetry import LiveStatus, Telemetry


class Reporter(Protocol):
    def phase(self, phase: p.Phase, step: int) -> None: ...
    def step(self, m: p.StepMetrics) -> None: ...
    def evaluation(self, e: p.EvalResult) -> None: ...
    def checkpoint(self, c: p.CheckpointSaved) -> None: ...
    def stopping(self, s: p.WorkerStopping) -> None: ...
    def close(self) -> None: ...


class RunReporter:
    """structlog events, logs/metrics.jsonl and the progress line."""

    def __init__(self, progress: Progress, metrics_path: Path, steps_per_report: int,
                 out: TextIO | None = None):
        self.progress = progress
        self.steps_per_report = steps_per_report
        self.log = structlog.get_logger("worker")
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self._metrics = open(metrics_path, "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._out = out or sys.stdout
        self._tty = hasattr(self._out, "isatty") and self._out.isatty()

    def phase(self, phase: p.Phase, step: int) -> None:
        self.log.info("phase_changed", phase=phase.value, step=step)

    def step(self, m: p.StepMetrics) -> None:
        self.progress.record_step(m.step, m.loss, m.lr, m.tokens, m.step_seconds, m.active_mb)
        self._metrics.write(json.dumps(m.to_dict()) + "\n")
        if m.step % self.steps_per_report == 0 or m.step == self.progress.total_steps:
            structlog.contextvars.bind_contextvars(step=m.step)
            line = self.progress.line()
            self.log.info(
                "progress", step=m.step, loss=m.loss, loss_avg=self.progress.loss_avg,
                lr=m.lr, grad_norm=m.grad_norm, tokens_per_sec=self.progress.tokens_per_sec,
                eta_h=self.progress.eta_hours, active_mb=m.active_mb, peak_mb=m.peak_mb,
                rss_mb=m.rss_mb, memory_warning=self.progress.memory_warning,
            )
            end = "\r" if self._tty and m.step != self.progress.total_steps else "\n"
            print(("\x1b[2K" if self._tty else "") + line, end=end, file=self._out, flush=True)

    def evaluation(self, e: p.EvalResult) -> None:
        self.progress.val, self.progress.best_val = e.val_loss, e.best_val_loss
        self.log.info("evaluated", step=e.step, val_loss=e.val_loss,
                      best_val_loss=e.best_val_loss, best_step=e.best_step, seconds=e.seconds)

    def checkpoint(self, c: p.CheckpointSaved) -> None:
        self.progress.last_checkpoint_step = max(self.progress.last_checkpoint_step, c.step)
        self.log.info("checkpoint_saved", step=c.step, path=c.path, seconds=c.seconds,
                      bytes=c.bytes)

    def stopping(self, s: p.WorkerStopping) -> None:
        if self._tty:
            print(file=self._out)
        level = "info" if s.reason in ("completed", "early_stopped", "graceful_stop") else "error"
        getattr(self.log, level)("worker_stopping", step=s.step, reason=s.reason,
                                 exit_code=s.exit_code, detail=s.detail,
                                 first_bad_step=s.first_bad_step)

    def close(self) -> None:
        self._metrics.close()


class TelemetryReporter:
    def __init__(self, telemetry: Telemetry, status: LiveStatus):
        self.telemetry = telemetry
        self.status = status

    def phase(self, phase: p.Phase, step: int) -> None:
        changed = phase != self.status.phase
        self.status.phase, self.status.step = phase, step
        if changed:
            self.telemetry.beat_now()

    def step(self, m: p.StepMetrics) -> None:
        s = self.status
        s.step, s.last_step_time, s.active_mb, s.peak_mb = m.step, m.time, m.active_mb, m.peak_mb
        self.telemetry.send(m)

    def evaluation(self, e: p.EvalResult) -> None:
        self.telemetry.send(e)

    def checkpoint(self, c: p.CheckpointSaved) -> None:
        self.telemetry.send(c)

    def stopping(self, s: p.WorkerStopping) -> None:
        self.status.phase = p.Phase.STOPPING
        self.telemetry.send(s)

    def close(self) -> None:
        self.telemetry.close()


class TensorBoardReporter:
    """Scalars for TensorBoard in RUN_DIR/tensorboard, when the optional tensorboardX is
    installed: train/loss, train/grad_norm, train/tokens_per_sec (means over the report
    window), train/lr, memory/active_mb, val/loss. Written at report steps, not every step:
    five add_scalar calls cost ~0.2 ms, a few percent of a small model's step."""

    def __init__(self, logdir: Path, every: int):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(logdir), flush_secs=30)
        self.every = every
        self._window: list[p.StepMetrics] = []

    def phase(self, phase: p.Phase, step: int) -> None:
        pass

    def step(self, m: p.StepMetrics) -> None:
        self._window.append(m)
        if m.step % self.every:
            return
        w, self._window = self._window, []
        n = len(w)
        for name, value in (
            ("train/loss", sum(x.loss for x in w) / n),
            ("train/grad_norm", sum(x.grad_norm for x in w) / n),
            ("train/tokens_per_sec", sum(x.tokens for x in w) / sum(x.step_seconds for x in w)),
            ("train/lr", m.lr), ("memory/active_mb", m.active_mb),
        ):
            self.writer.add_scalar(name, value, m.step)

    def evaluation(self, e: p.EvalResult) -> None:
        self.writer.add_scalar("val/loss", e.val_loss, e.step)

    def checkpoint(self, c: p.CheckpointSaved) -> None:
        pass

    def stopping(self, s: p.WorkerStopping) -> None:
        pass

    def close(self) -> None:
        self.writer.close()


def tensorboard_reporter(logdir: Path, every: int) -> TensorBoardReporter | None:
    try:
        return TensorBoardReporter(logdir, every)
    except ImportError:
        return None


class FanOut:
    def __init__(self, *reporters: Any):
        self.reporters = reporters

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            for r in self.reporters:
                getattr(r, name)(*args, **kwargs)

        return call
