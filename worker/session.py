"""One worker attempt from start to exit: pick the checkpoint, build everything, train, finish.

Kept apart from the loop (worker/train.py) so the loop stays a loop, and from the command
line (worker/main.py) so the command line stays parsing. Where it starts from is
worker/resume.py; what a completed run leaves, worker/finish.py.

Longer than 400 lines: the outer boundary — every way an attempt ends, a full disk and the
machine's limits included (exit codes 24, 71) — stays in one place with the attempt it bounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from shared import blas, completion, mlx_lm_keys, openfile_limit
from shared import protocol as p
from shared.checkpoint import clean_leftovers
from shared.config import Config
from shared.errors import (
    CheckpointError,
    CheckpointRefused,
    ConfigError,
    DataError,
    DiskFull,
    OvernightError,
    SystemLimitError,
)
from shared.exitcodes import ExitCode
from shared.fsutil import disk_full_message, is_disk_full, quiet_unwritable_output
from shared.layout import RunDir
from shared.progress import Progress
from shared.trainer_state import DataIdentity
from worker import distributed, early_load
from worker.finish import finish, make_adapter_dir, mlx_lm_test_pass, test_subset
from worker.inject import ENV as INJECT_ENV
from worker.inject import Injector
from worker.reporting import (
    FanOut,
    RunReporter,
    TelemetryReporter,
    callback_reporter,
    check_report_to,
    skip_unrequested_reporters,
    tensorboard_reporter,
)
from worker.resume import check_data, choose_checkpoint, move_previous_aside, reconcile
from worker.signals import Stopper
from worker.telemetry import LiveStatus, Telemetry
from worker.train import Controls, Outcome, Trainer, TrainState

log = structlog.get_logger("worker")
INJECT_RANK_ENV = "OVERNIGHT_INJECT_RANK"  # the rank of a group whose faults fire (tests)


class Session:
    def __init__(self, config: Config, run: RunDir, run_id: str, args: argparse.Namespace,
                 overrides: dict[str, Any] | None = None):
        """`overrides`: the config keys the command line set (worker/main.py overrides_from)."""
        self.config = config
        self.run_dir = run
        self.run_id = run_id
        self.args = args
        self.overrides = overrides or {}
        self.controls = Controls()
        self.status = LiveStatus(run_id, args.attempt, config.iters)
        self.telemetry: Telemetry | None = None
        self.reporter: Any = None
        self.trainer: Trainer | None = None
        self._adapter_dir: Path | None = None  # mlx_lm's adapter_path, created at start
        self._test_usable: int | None = None  # streaming: usable rows of the test subset
        self.group: Any = None  # a data-parallel group's rank (worker/distributed.py)

    # -------------------------------------------------------------- outer boundary
    def run(self) -> ExitCode:
        Stopper(self.controls).install()
        if self.args.telemetry:
            self.telemetry = Telemetry(self.args.telemetry, self.status)
        log.info(
            "worker_started",
            pid=os.getpid(),
            attempt=self.args.attempt,
            run_dir=str(self.run_dir.root),
            telemetry=self.args.telemetry,
            blas=blas.loaded(),  # one BLAS per run (shared/blas.py)
        )
        try:
            outcome = self._run()
        except DiskFull as e:  # a checkpoint that did not fit (worker/checkpointing.py)
            outcome = Outcome(ExitCode.DISK_FULL, "disk_full", str(e))
        except SystemLimitError as e:
            outcome = Outcome(ExitCode.SYSTEM_LIMIT, "system_limit", str(e))
        except CheckpointRefused as e:  # the checkpoint's fault: quarantined, an older one next
            outcome = Outcome(ExitCode.CHECKPOINT_REFUSED, "checkpoint_refused", str(e))
        except (ConfigError, DataError, CheckpointError) as e:
            outcome = Outcome(ExitCode.BAD_CONFIG, "bad_config", str(e))
        except OvernightError as e:
            outcome = Outcome(ExitCode.CRASH, "crash", str(e))
        except BrokenPipeError:
            # Our output's reader went away (`overnight train ... | head`): not a crash to
            # log with a traceback; the CLI's boundary ends the process quietly (exit 141).
            step = self.trainer.state.step if self.trainer is not None else self.status.step
            log.warning("output_closed", step=step)
            self._close()
            raise
        except BaseException as e:
            if not is_disk_full(e):  # any other write that found no space: metrics, logs
                log.exception("worker_crashed", step=self.status.step)
                self._send_stopping(Outcome(ExitCode.CRASH, "crash", "uncaught exception"))
                self._close()
                raise
            outcome = Outcome(ExitCode.DISK_FULL, "disk_full",
                              disk_full_message(e, self.run_dir.root))
        self._send_stopping(outcome)
        self._close(disk_full=outcome.code is ExitCode.DISK_FULL)
        if outcome.code in (ExitCode.BAD_CONFIG, ExitCode.CRASH, ExitCode.DISK_FULL,
                            ExitCode.SYSTEM_LIMIT, ExitCode.CHECKPOINT_REFUSED):
            # Last on stderr: the one line a person (or the supervisor) needs.
            with contextlib.suppress(OSError):  # stderr may be a file on the full disk
                print(f"overnight train: {outcome.detail}", file=sys.stderr, flush=True)
            quiet_unwritable_output()
        return outcome.code

    def _send_stopping(self, o: Outcome) -> None:
        step = self.trainer.state.step if self.trainer is not None else self.status.step
        msg = p.WorkerStopping(
            run_id=self.run_id,
            attempt=self.args.attempt,
            step=step,
            exit_code=int(o.code),
            reason=o.reason,
            detail=o.detail,
            first_bad_step=o.first_bad_step,
            data_position=o.data_position,
            data_batch=o.data_batch,
            data_lines=o.data_lines,
            first_bad_position=o.first_bad_position,
        )
        if self.reporter is not None:
            self.reporter.stopping(msg)
        else:
            level = "info" if o.code in (ExitCode.COMPLETED, ExitCode.GRACEFUL_STOP) else "error"
            getattr(log, level)(  # the same fields as the reporter's worker_stopping
                "worker_stopping", step=step, reason=o.reason, exit_code=int(o.code),
                detail=o.detail, first_bad_step=o.first_bad_step,
            )
            if self.telemetry is not None:
                self.telemetry.send(msg)

    def _close(self, disk_full: bool = False) -> None:
        """Close the reporters (or the telemetry alone); on a full disk one by one, a file
        that cannot be flushed ignored, so that telemetry still delivers the last message."""
        parts = [self.telemetry] if self.reporter is None else self.reporter.reporters
        for part in (x for x in parts if x is not None):
            with contextlib.suppress(*((OSError,) if disk_full else ())):
                part.close()

    def _phase(self, phase: p.Phase) -> None:
        self.status.phase = phase
        if self.telemetry is not None:
            self.telemetry.beat_now()
        log.info("phase_changed", phase=phase.value, step=self.status.step)

    # -------------------------------------------------------------- the attempt
    def _run(self) -> Outcome:
        c, run, args = self.config, self.run_dir, self.args
        limit = openfile_limit.problem()  # mlx_lm's import would fail: say why, at once
        if limit is not None:
            raise SystemLimitError(limit)
        skip_unrequested_reporters(c)  # before the first mlx_lm import
        if run.is_complete and not args.fresh:
            more = completion.more_iters_asked(completion.read_marker(run) or {}, c.iters, run)
            log.info("run_already_complete", marker=str(run.complete_marker),
                     **({"detail": more} if more else {}))
            print(
                f"overnight train: run in {run.root} is already complete; "
                + (more if more else "nothing to do (--fresh starts over)"),
                file=sys.stderr,
            )
            return Outcome(ExitCode.COMPLETED, "completed", "run was already complete")
        self.group = group = distributed.init_group(c)  # None: one process
        writes = group is None or group.writes  # rank 0 alone writes the run directory
        if args.fresh and writes:
            move_previous_aside(self.run_dir)
        cleaned = clean_leftovers(run.checkpoints) if writes else []  # half-done dirs
        if cleaned:
            log.info("checkpoint_leftovers_removed", names=cleaned)
        preloaded = None
        if getattr(args, "resume_fd", None) is not None and group is None:
            self._phase(p.Phase.LOADING)  # while the supervisor validates (worker/early_load.py)
            preloaded = early_load.load_model(c)
            if not early_load.await_resume(args, c, lambda: self.controls.stop_requested):
                return Outcome(ExitCode.GRACEFUL_STOP, "graceful_stop",
                               "stopped before the supervisor chose a checkpoint")
        chosen, stored = distributed.choose_checkpoint(group, self.args, self.run_dir,
                                                       choose_checkpoint)
        if chosen is not None and stored is not None:
            c = reconcile(c, stored, chosen)
        self.config = c
        if self.controls.stop_requested:
            return Outcome(ExitCode.GRACEFUL_STOP, "graceful_stop", "stopped before loading")

        if preloaded is None:
            self._phase(p.Phase.LOADING)
        log.info("config_resolved", config=c.to_dict(), config_hash=c.hash())
        from worker.datafiles import load_splits, locate, require_usable

        files = locate(c)  # before anything is loaded or trained: one line per problem
        check_report_to(c)
        self._adapter_dir = make_adapter_dir(c) if writes else None
        self._announce_differences(c, files.valid is not None)
        from worker import model as models
        from worker.batching import fixed_subset, plan_for_resume
        from worker.checkpointing import CheckpointWriter, restore
        from worker.monitors import EarlyStopper, SpikeDetector

        model, tokenizer = preloaded or early_load.load_model(c)
        if chosen is None and c.resume_adapter_file:
            # mlx_lm's resume_adapter_file: the starting weights of a fresh run (a run with a
            # checkpoint of its own resumes from that instead).
            loaded, n = models.load_adapter_weights(model, c.resume_adapter_file)
            log.info("adapter_weights_loaded", path=str(loaded), tensors=n)
        lr_scale = (
            args.lr_scale
            if args.lr_scale is not None
            else (stored.lr_scale if stored else 1.0)
        )
        optimizer, schedule = models.make_optimizer(c, lr_scale)
        optimizer.init(model.trainable_parameters())

        use = stored.data.use if chosen is not None and stored and stored.data else None
        train_set, valid_set, test_set = load_splits(files, tokenizer, c, use)

        state = TrainState(lr_scale=lr_scale)
        stopper = EarlyStopper(c.early_stopping)
        spikes = SpikeDetector(c.grad_spike)
        progress = Progress(c.iters)
        if chosen is not None and stored is not None:
            restore(chosen, model, optimizer)
            check_data(stored, train_set)
            state = TrainState(
                step=stored.step, data_position=stored.data_position + args.skip_steps,
                lr_scale=lr_scale, tokens_total=stored.tokens_total,
                train_seconds=stored.train_seconds,
                best_val=stored.best.val_loss, best_step=stored.best.step,
                val_examples=stored.val_examples, last_val=stored.last_val_loss,
            )
            stopper = EarlyStopper.from_state(c.early_stopping, stored.early_stopping)
            spikes = SpikeDetector.from_state(c.grad_spike, stored.grad_spike)
            progress.losses.extend(stored.loss_history)
            progress.step_seconds.extend(stored.step_seconds)
            progress.tokens.extend(stored.step_tokens)
            progress.val = state.last_val
            progress.best_val = state.best_val
            progress.step = progress.last_checkpoint_step = state.step
            log.info(
                "resumed",
                checkpoint=str(chosen),
                step=state.step,
                data_position=state.data_position,
                skip_steps=args.skip_steps,
                lr_scale=lr_scale,
            )
        if args.skip_steps and chosen is None:
            state.data_position += args.skip_steps
        if valid_set is not None and state.val_examples < 0:
            per = c.val_batches * c.batch_size if c.val_batches >= 0 else -1
            state.val_examples = len(valid_set) if per < 0 else min(per, len(valid_set))
        val_subset = (
            fixed_subset(len(valid_set), state.val_examples, c.seed)
            if valid_set is not None
            else None
        )
        if valid_set is not None and val_subset is not None and valid_set.streaming:
            require_usable(valid_set, val_subset, "validation")
        if test_set is not None and test_set.streaming:
            self._test_usable = require_usable(test_set, test_subset(test_set, c), "test")

        plan, plan_note = plan_for_resume(
            train_set.lengths, c.effective_batch, c.seed, stored if chosen is not None else None
        )
        if plan_note:
            log.warning("data_plan_changed", detail=plan_note, plan=plan.to_dict())
            print(f"overnight train: {plan_note}", file=sys.stderr, flush=True)
        skip_batches = frozenset(stored.skipped_batches if stored else ()) | frozenset(
            getattr(args, "skip_batch", None) or []
        )
        self.status.step = state.step
        reporters: list[Any] = [RunReporter(progress, run.metrics_log, c.steps_per_report)]
        if not writes:  # another rank: heartbeats and its steps only, no files
            reporters = []
        if self.telemetry is not None:
            reporters.append(TelemetryReporter(self.telemetry, self.status))
        board = tensorboard_reporter(c, run.root / "tensorboard") if writes else None
        if board is not None:
            reporters.append(board)
            log.info("tensorboard_enabled", logdir=str(run.root / "tensorboard"))
        callbacks = (callback_reporter(c, run.root, c.iters, state.tokens_total)
                     if writes else None)
        if callbacks is not None:
            reporters.append(callbacks)
            log.info(
                "report_to_enabled",
                services=c.report_to,
                project_name=c.project_name,
                log_dir=str(run.root),
            )
        self.reporter = FanOut(*reporters)
        group_controls = Controls()  # a group's loop acts on agreed requests only
        if group is not None:
            group.raw = self.controls  # what the signal handlers set (worker/distributed.py)
        spec = os.environ.get(INJECT_ENV) or c.debug.inject
        if group is not None and group.rank != int(os.environ.get(INJECT_RANK_ENV, "0") or 0):
            spec = ""  # a group's injected faults fire on one rank (default 0)
        trainer = Trainer(
            config=c,
            run_id=self.run_id,
            attempt=args.attempt,
            model=model,
            optimizer=optimizer,
            train_set=train_set,
            valid_set=valid_set,
            val_subset=val_subset if val_subset is not None else np.arange(0),
            plan=plan,
            state=state,
            stopper=stopper,
            spikes=spikes,
            writer=CheckpointWriter(
                run.checkpoints, c.checkpoints.keep_last, c.checkpoints.async_save
            ),
            reporter=self.reporter,
            progress=progress,
            controls=self.controls if group is None else group_controls,
            injector=Injector(spec, run.root / "inject"),
            adapter_config=models.adapter_config(c),
            lr_schedule=schedule,
            state_extra={
                "versions": _versions(),
                "data": DataIdentity(
                    train_fingerprint=train_set.index.fingerprint,
                    train_examples=len(train_set),
                ),
            },
            last_saved_step=state.step,
            skip_batches=skip_batches,
            skip_positions=frozenset(getattr(args, "skip_position", None) or []),
            group=group,
        )
        self.trainer = trainer
        if stored is not None and stored.reason == "early_stop" and c.early_stopping.enabled:
            # Killed after the early-stop checkpoint, before COMPLETE: the run had stopped
            # there; finish it as the uninterrupted run did, without training on.
            log.info("early_stop_resumed", step=stored.step, checkpoint=str(chosen))
            outcome = trainer.early_stopped()
        else:
            outcome = trainer.run()
        trainer.writer.wait()
        if not writes:
            return outcome  # rank 0 runs the test pass and publishes the adapters
        if outcome.code in (ExitCode.COMPLETED, ExitCode.EARLY_STOPPED):
            test = None
            if test_set is not None:
                self._phase(p.Phase.EVALUATING)
                test = mlx_lm_test_pass(trainer, test_set, self.config, self._test_usable)
            # A run resumed from its final or early-stop checkpoint (killed before COMPLETE
            # was written, or --resume of a finished run's checkpoint) trains nothing: that
            # checkpoint is final.
            final = trainer.writer.last.path if trainer.writer.last is not None else chosen
            if final is None:
                raise CheckpointError("the run ended without a checkpoint to publish")
            finish(self.run_dir, self.config, trainer, outcome, final, self._adapter_dir, test)
        return outcome

    # -------------------------------------------------------------- helpers
    def _announce_differences(self, c: Config, has_valid: bool) -> None:
        """The start-up block: how this run differs from `mlx_lm lora` with the same config
        (stderr, and one structlog event), and the keys that do nothing here."""
        file_values: dict[str, Any] = {}
        if self.args.config is not None:
            from shared.yamlfile import load_yaml

            file_values = load_yaml(Path(self.args.config))
        given = {k for k, v in file_values.items() if v is not None} | {
            k.split(".")[0] for k in self.overrides
        }
        diffs = mlx_lm_keys.differences(c, given, has_valid)
        log.info("mlx_lm_differences", differences=[d.line() for d in diffs])
        print(mlx_lm_keys.render(diffs), file=sys.stderr, flush=True)
        for warning in mlx_lm_keys.warnings(file_values, c):
            log.warning("config_key_ignored", detail=warning)

def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mlx", "mlx-lm", "mlx-overnight"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out

