"""How the training loop reports: one interface, several sinks.

The loop calls a `Reporter`; it never prints, logs or sends directly. `RunReporter` writes
the structlog events, the per-step metrics file and the progress line; `TelemetryReporter`
publishes to the supervisor; `TensorBoardReporter` writes scalars (`report_to: tensorboard`,
ours); `CallbackReporter` feeds mlx_lm's own reporting callbacks (`report_to: wandb,
swanlab`); `FanOut` combines them. A reporting package is imported only when the run asks.
Tests pass a recording fake.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Protocol, TextIO

import structlog

from shared import protocol as p
from shared.config import MLX_LM_REPORTERS, Config
from shared.errors import ConfigError
from shared.progress import Progress
from worker.telemetry import LiveStatus, Telemetry


class Reporter(Protocol):
    """What the loop reports, in its order: for each step `step()` (its metrics, as soon as
    it is computed), `evaluation()` when the step is an evaluation step, then `step_done()`
    (everything about the step is known: the progress line shows this step's evaluation)."""

    def phase(self, phase: p.Phase, step: int) -> None: ...
    def step(self, m: p.StepMetrics) -> None: ...
    def step_done(self, step: int) -> None: ...
    def evaluation(self, e: p.EvalResult) -> None: ...
    def checkpoint(self, c: p.CheckpointSaved) -> None: ...
    def stopping(self, s: p.WorkerStopping) -> None: ...
    def close(self) -> None: ...


class RunReporter:
    """structlog events, logs/metrics.jsonl and the progress line."""

    def __init__(
        self,
        progress: Progress,
        metrics_path: Path,
        steps_per_report: int,
        out: TextIO | None = None,
    ):
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
        # to_dict() already wrote non-finite floats as strings: plain json.dumps suffices
        self._metrics.write(json.dumps(m.to_dict(), allow_nan=False) + "\n")
        if m.step % self.steps_per_report == 0 or m.step == self.progress.total_steps:
            structlog.contextvars.bind_contextvars(step=m.step)
            self.log.info(
                "progress",
                step=m.step,
                loss=m.loss,
                loss_avg=self.progress.loss_avg,
                lr=m.lr,
                grad_norm=m.grad_norm,
                tokens_per_sec=self.progress.tokens_per_sec,
                eta_h=self.progress.eta_hours,
                active_mb=m.active_mb,
                peak_mb=m.peak_mb,
                rss_mb=m.rss_mb,
                memory_warning=self.progress.memory_warning,
            )

    def step_done(self, step: int) -> None:
        """The progress line of a report step, printed once the step's evaluation (if it has
        one) is in: at an evaluation step `val=` is that evaluation, not the one before."""
        if step % self.steps_per_report == 0 or step == self.progress.total_steps:
            line = self.progress.line()
            end = "\r" if self._tty and step != self.progress.total_steps else "\n"
            print(("\x1b[2K" if self._tty else "") + line, end=end, file=self._out, flush=True)

    def evaluation(self, e: p.EvalResult) -> None:
        self.progress.val, self.progress.best_val = e.val_loss, e.best_val_loss
        self.log.info(
            "evaluated",
            step=e.step,
            val_loss=e.val_loss,
            best_val_loss=e.best_val_loss,
            best_step=e.best_step,
            seconds=e.seconds,
        )

    def checkpoint(self, c: p.CheckpointSaved) -> None:
        self.progress.last_checkpoint_step = max(self.progress.last_checkpoint_step, c.step)
        self.log.info(
            "checkpoint_saved", step=c.step, path=c.path, seconds=c.seconds, bytes=c.bytes
        )

    def stopping(self, s: p.WorkerStopping) -> None:
        if self._tty:
            print(file=self._out)
        level = "info" if s.reason in ("completed", "early_stopped", "graceful_stop") else "error"
        getattr(self.log, level)(
            "worker_stopping",
            step=s.step,
            reason=s.reason,
            exit_code=s.exit_code,
            detail=s.detail,
            first_bad_step=s.first_bad_step,
            **(
                {
                    "data_position": s.data_position,
                    "data_batch": s.data_batch,
                    "data_lines": s.data_lines,
                }
                if s.data_position >= 0
                else {}
            ),
        )

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
        s.cache_mb = m.cache_mb
        self.telemetry.send(m)

    def step_done(self, step: int) -> None:
        pass

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
    """Scalars for TensorBoard in RUN_DIR/tensorboard (`report_to: tensorboard`; needs the
    optional tensorboardX): train/loss, train/grad_norm, train/tokens_per_sec (means over the report
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
            ("train/lr", m.lr),
            ("memory/active_mb", m.active_mb),
        ):
            self.writer.add_scalar(name, value, m.step)

    def step_done(self, step: int) -> None:
        pass

    def evaluation(self, e: p.EvalResult) -> None:
        self.writer.add_scalar("val/loss", e.val_loss, e.step)

    def checkpoint(self, c: p.CheckpointSaved) -> None:
        self.writer.flush()  # a killed attempt keeps its scalars up to its last checkpoint

    def stopping(self, s: p.WorkerStopping) -> None:
        pass

    def close(self) -> None:
        self.writer.close()


def tensorboard_reporter(c: Config, logdir: Path) -> TensorBoardReporter | None:
    """TensorBoard scalars in `logdir` when the run asks (`report_to: tensorboard`), else None
    and tensorboardX is not imported (~20 ms of imports and ~18 MB of RSS per start). An
    existing `logdir` the run does not ask for (an earlier version wrote it whenever
    tensorboardX was installed) is left as it is, and stderr says once how to keep writing
    it; a resumed run that asks appends new event files beside the old ones."""
    if "tensorboard" in (c.report_to or []):
        return TensorBoardReporter(logdir, c.steps_per_report)
    if logdir.is_dir():
        structlog.get_logger("worker").info("tensorboard_not_requested", logdir=str(logdir))
        print(f"overnight train: {logdir} is not written by this run: add report_to: "
              "tensorboard to the config to keep writing it", file=sys.stderr, flush=True)
    return None


# report_to name -> module to import; tensorboard is ours, the others go to mlx_lm's callbacks
PACKAGES = {"wandb": "wandb", "swanlab": "swanlab", "tensorboard": "tensorboardX"}


def skip_unrequested_reporters(c: Config) -> None:
    """Keep mlx_lm (and anything else) from importing reporting packages this run does not
    report to.

    Any `mlx_lm.tuner` import runs mlx_lm/tuner/callbacks.py, whose `try: import wandb`
    (and swanlab) imports the package whenever it is installed: about a second of start-up
    for wandb, on every worker start and restart. A None in sys.modules makes that import
    raise ImportError, the branch mlx_lm takes when the package is absent. Call before the
    first mlx_lm import; packages already imported are left alone.
    """
    asked = set(c.report_to or [])
    for name, module in PACKAGES.items():
        if name not in asked and module not in sys.modules:
            sys.modules[module] = None  # type: ignore[assignment]


def check_report_to(c: Config) -> None:
    """At start: every `report_to` service has its package installed (ConfigError if not)."""
    for name in c.report_to or []:
        module = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"report_to: {name} is not installed in this Python "
                f"({sys.executable}): pip install {module}, or remove it "
                "from report_to"
            )


class CallbackReporter:
    """mlx_lm's reporting callbacks (`mlx_lm.tuner.callbacks.get_reporting_callbacks`), fed
    the dicts mlx_lm's trainer gives them (mlx_lm/tuner/trainer.py, 0.32.2):

        on_train_loss_report({"iteration", "train_loss", "learning_rate",
                              "iterations_per_second", "tokens_per_second",
                              "trained_tokens", "peak_memory"})      every steps_per_report
        on_val_loss_report({"iteration", "val_loss", "val_time"})    after each evaluation

    train_loss is the mean step loss over the report window, the rates are over the window's
    step time, trained_tokens counts from the start of the run (a resumed attempt continues
    the count), peak_memory is in GB (1e9 bytes), as mlx_lm. A callback that raises is
    logged once and dropped: a reporting service never ends the night.
    """

    def __init__(
        self, callback: Any, every: int, total_steps: int, names: list[str], trained_tokens: int = 0
    ):
        self.callback = callback
        self.every = every
        self.total_steps = total_steps
        self.names = names
        self.trained_tokens = trained_tokens
        self._window: list[p.StepMetrics] = []
        self.log = structlog.get_logger("worker")

    def _call(self, method: str, info: dict[str, Any]) -> None:
        if self.callback is None:
            return
        try:
            getattr(self.callback, method)(info)
        except Exception as e:  # wandb/swanlab raise many kinds; training goes on
            self.log.warning("report_to_failed", services=self.names, error=str(e))
            self.callback = None

    def phase(self, phase: p.Phase, step: int) -> None:
        pass

    def step(self, m: p.StepMetrics) -> None:
        self._window.append(m)
        self.trained_tokens += m.tokens
        if m.step % self.every and m.step != self.total_steps:
            return
        w, self._window = self._window, []
        seconds = sum(x.step_seconds for x in w)
        self._call(
            "on_train_loss_report",
            {
                "iteration": m.step,
                "train_loss": sum(x.loss for x in w) / len(w),
                "learning_rate": m.lr,
                "iterations_per_second": len(w) / seconds if seconds > 0 else 0.0,
                "tokens_per_second": sum(x.tokens for x in w) / seconds if seconds > 0 else 0.0,
                "trained_tokens": self.trained_tokens,
                "peak_memory": max(x.peak_mb for x in w) * 2**20 / 1e9,
            },
        )

    def step_done(self, step: int) -> None:
        pass

    def evaluation(self, e: p.EvalResult) -> None:
        self._call(
            "on_val_loss_report",
            {"iteration": e.step, "val_loss": e.val_loss, "val_time": e.seconds},
        )

    def checkpoint(self, c: p.CheckpointSaved) -> None:
        pass

    def stopping(self, s: p.WorkerStopping) -> None:
        pass

    def close(self) -> None:
        """Finish the services' runs, so that (e.g.) wandb's offline directory is complete."""
        for name in self.names:
            module = sys.modules.get(PACKAGES[name])
            finish = getattr(module, "finish", None)
            if finish is not None:
                try:
                    finish()
                except Exception as e:  # never let a reporting service fail the exit
                    self.log.warning("report_to_finish_failed", service=name, error=str(e))


def callback_reporter(
    c: Config, log_dir: Path, total_steps: int, trained_tokens: int = 0
) -> CallbackReporter | None:
    """mlx_lm's callbacks for `report_to`, or None (and nothing imported) without it.

    As `mlx_lm lora`: project_name, log_dir (the run's name is its last part) and the config
    as a dict. A service that cannot start is a ConfigError (one line, exit 78).
    """
    names = [name for name in c.report_to or [] if name in MLX_LM_REPORTERS]
    if not names:
        return None
    check_report_to(c)
    from mlx_lm.tuner.callbacks import get_reporting_callbacks

    try:
        callback = get_reporting_callbacks(
            ",".join(names),
            project_name=c.project_name,
            log_dir=str(log_dir),
            config=c.to_dict(),
        )
    except Exception as e:  # wandb.init/swanlab.init: login, permissions, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"report_to: {','.join(names)} could not start: {first}") from None
    return CallbackReporter(callback, c.steps_per_report, total_steps, names, trained_tokens)


class FanOut:
    def __init__(self, *reporters: Any):
        self.reporters = reporters

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> None:
            for r in self.reporters:
                getattr(r, name)(*args, **kwargs)

        return call
