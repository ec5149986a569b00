"""The run's attempts, one after another: start the next one from the chosen checkpoint with
the settings the policy chose, fold its telemetry into the run record, end it.

The loop (supervisor/daemon/loop.py) decides *when*; the pieces know *how*:
checkpoint_choice.py (which checkpoint, validated off the loop thread), worker_command.py
(the command line), spawn.py (the process), attempt.py (the running attempt), ending.py
(how it ended), policy.py (what next) and record.py (run.json). This module sequences them
and owns what outlives one attempt: the settings, the pending decision, the policy.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.checkpoint import CheckpointInfo, list_checkpoints, quarantine, validate
from shared.completion import more_iters_asked, read_marker
from shared.config import Config
from shared.exitcodes import FailureClass
from shared.faults import fired_in, marker_dir
from shared.fsutil import describe_space, free_space, human_bytes
from shared.layout import RunDir
from shared.protocol import CheckpointSaved, EvalResult, Message, WorkerStopping
from shared.run_record import AttemptRecord, BestCheckpoint, LatestCheckpoint, WorkerInfo
from supervisor.daemon import ending
from supervisor.daemon.attempt import Attempt
from supervisor.daemon.checkpoint_choice import Choice, choose, clean_up_after
from supervisor.daemon.diskspace import POLL_SECONDS, WAITING_LOG_EVERY, SpaceWatch
from supervisor.daemon.early_start import EarlyWorker, start_early
from supervisor.daemon.group import GroupProcess, group_end, group_fields
from supervisor.daemon.policy import Decision, Policy, Settings
from supervisor.daemon.record import RecordKeeper, now_iso
from supervisor.daemon.spawn import PopenSpawner, Spawner
from supervisor.daemon.state import AlreadyComplete, State, Verdict
from supervisor.daemon.telemetry_gate import new_token
from supervisor.daemon.worker_command import worker_argv, worker_env


class AttemptRunner:
    def __init__(
        self, *, config: Config, config_path: Path, run: RunDir, record: RecordKeeper,
        spawner: Spawner, policy: Policy, env: dict[str, str], command: list[str], log: Any,
    ) -> None:
        self.config = config
        self.opts = config.supervisor
        self.config_path = config_path
        self.run = run
        self.record = record
        self.spawner = spawner
        self.policy = policy
        self.env = env
        self.command = command
        self.log = log
        self.supervisor_pid = os.getpid()
        base = Settings(config.batch_size, config.grad_accumulation_steps, config.grad_checkpoint)
        stored = record.record.overrides
        self.settings = Settings.from_dict({**base.to_dict(), **stored}) if stored else base
        self.base_settings = base
        last = record.attempts[-1] if record.attempts else None
        if last is not None:
            # Progress is the highest step ever reached, from the worker's metrics: an
            # attempt a killed supervisor never saw end got further than run.json says.
            policy.high_water = max(policy.high_water, last.end_step,
                                    ending.last_logged_step(run.metrics_log, last.attempt))
        for a in record.attempts:  # a restarted supervisor knows which batches were non-finite
            bad = a.bad_data
            if a.classification is FailureClass.NON_FINITE and bad is not None and bad.batch >= 0:
                policy.nonfinite_batches.setdefault(bad.batch, bad.lr_scale)
            if a.classification is FailureClass.METAL_RESOURCE_LIMIT:  # the recycle point
                policy.note_resource_limit(max(1, a.end_step - a.start_step))
        self.attempt: Attempt | None = None  # the attempt that runs (None between attempts)
        self.early: EarlyWorker | None = None  # started, its checkpoint not yet chosen
        self.pending: Decision | None = None  # the decision that asked for the next attempt
        self.prev_end_at: float | None = None
        self.progress_dirty = False
        self.space = SpaceWatch(run.root, config.checkpoints.keep_last)  # diskspace.py

    # ---- start ---------------------------------------------------------------------------

    def chooser(self) -> Callable[[], Choice]:
        """The checkpoint choice for the next attempt, as work for a background thread (it
        only reads the checkpoints)."""
        before = self.pending.rollback_before if self.pending is not None else None
        return lambda: choose(self.run.checkpoints, before)

    def start_early(self) -> str | None:
        """Start the next attempt's worker now, before its checkpoint is chosen
        (supervisor/daemon/early_start.py); its telemetry token, or None when this run's
        workers start only once the choice is made (a group; a test spawner). OSError when
        the process cannot be started."""
        if not isinstance(self.spawner, PopenSpawner) or self.config.distributed.enabled:
            return None
        n = len(self.record.attempts) + 1
        argv = worker_argv(self.command, self.config_path, self.run, n, self.record.run_id,
                           None, self.settings, self.base_settings, 0, handoff=True)
        token = new_token()
        self.early = start_early(self.spawner, argv, worker_env(self.env, token),
                                 self.run.attempt_output(n), n, token)
        self.log.info("worker_started_early", attempt=n, worker_pid=self.early.proc.pid,
                      argv=self.early.argv)
        return token

    def abandon_early(self) -> None:
        """The early worker's start is not wanted after all (a stop while validating, the
        supervisor leaving): close its pipe and stop it (blocking, stop_timeout at most)."""
        early, self.early = self.early, None
        if early is not None:
            how = early.abandon(self.opts.stop_timeout)
            self.log.info("worker_start_abandoned", attempt=early.attempt,
                          worker_pid=early.proc.pid, how=how.value)

    def start(self, choice: Choice, now: float) -> tuple[int, int]:
        """Apply the checkpoint choice, then tell the early worker where to resume from, or
        spawn the next attempt; returns (attempt, pid). OSError when the process cannot be
        started."""
        for info, reason in (*choice.invalid, *choice.set_aside):
            self._quarantine(info, reason)
        found = choice.found
        if found is None:
            self.log.info("checkpoint_none_valid", action="start fresh")
        else:
            self.log.info("checkpoint_validated", step=found[0].step, path=str(found[0].path),
                          seconds=round(choice.seconds, 3))
        start_step = found[0].step if found is not None else 0
        state = found[1].state if found is not None else None
        # A rollback's offending data: data positions (not steps; earlier skips put the
        # position ahead of the step), those still ahead of this checkpoint (policy.py).
        at = state.data_position if state is not None else 0
        ahead = tuple(p for p in self.settings.skip_positions if p >= at)
        skip, pending = 0, self.pending
        if pending is not None and pending.bad_until >= 0:  # the worker named no position
            skip = max(1, pending.bad_until - start_step)
        n = len(self.record.attempts) + 1
        # The command line, or (an early worker) what it is equivalent to: the one to start
        # this attempt again by hand, recorded in run.json.
        argv = worker_argv(self.command, self.config_path, self.run, n, self.record.run_id,
                           found, self.settings, self.base_settings, skip, ahead)
        early, self.early = self.early, None
        if early is not None:  # started while the checkpoint was validated: tell it
            handoff = early.tell(found, skip, ahead)
            output, token, proc = early.output, early.token, early.proc
            self.log.info("resume_handoff_sent", attempt=n, worker_pid=proc.pid,
                          resume=handoff.resume, skip_steps=handoff.skip_steps,
                          skip_positions=list(handoff.skip_positions))
        else:
            output = self.run.attempt_output(n)
            token = new_token()  # in the environment only: argv is logged and world-readable
            proc = self.spawner.spawn(argv, worker_env(self.env, token), output)
        skip += len(ahead)
        lr_scale = float(self.settings.lr_scale or (state.lr_scale if state else None) or 1.0)
        self.attempt = Attempt(n, proc, output, now, start_step, lr_scale, self.opts, token)
        self.attempt.resumed_from = found[0].path if found is not None else None
        reason = self.pending.reason if self.pending is not None else "initial"
        self.log.info("worker_spawned", attempt=n, worker_pid=proc.pid, argv=argv,
                      resume_step=start_step if found else None, skip_steps=skip,
                      settings=self.settings.to_dict(), log_file=str(output))
        started = now_iso()
        self.record.update(final_step=start_step, save=False)
        self.record.begin_attempt(
            AttemptRecord(
                attempt=n, pid=proc.pid, argv=tuple(argv),
                log=str(output.relative_to(self.run.root)), started=started, ended=None,
                start_reason=reason,
                resumed_from=LatestCheckpoint(found[0].step, str(found[0].path))
                if found else None,
                skip_steps=skip, lr_scale=self.settings.lr_scale,
                settings=self.settings.to_dict(), start_step=start_step,
                end_step=start_step, steps_gained=0,
            ),
            WorkerInfo(pid=proc.pid, attempt=n, started=started, argv=tuple(argv)),
        )
        return n, proc.pid

    def _set_refused_aside(self, attempt: Attempt, detail: str, decision: Decision
                           ) -> Decision:
        """The worker refused the checkpoint it was told to resume from: quarantine it like
        an invalid one; the next start keeps what the previous decision asked of it (a
        rollback's resume point and skipped steps) and takes the next older valid one."""
        path = attempt.resumed_from
        if path is not None and path.is_dir():
            self._quarantine(CheckpointInfo(attempt.view.start_step, path),
                             f"refused by the worker: {detail}")
        before = self.pending
        if before is None:
            return decision
        return dataclasses.replace(decision, rollback_before=before.rollback_before,
                                   bad_until=before.bad_until)

    def _quarantine(self, info: CheckpointInfo, reason: str) -> None:
        try:
            moved = quarantine(info, self.run.quarantine)
        except OSError as e:  # a full disk: it stays, unused (validated again next start)
            self.log.warning("checkpoint_quarantine_failed", checkpoint=info.path.name,
                             reason=reason, error=str(e))
            return
        self.log.warning("checkpoint_quarantined", checkpoint=info.path.name, reason=reason,
                         moved_to=str(moved))
        self.record.note_quarantine(info.path.name, moved, reason)

    # ---- while it runs -------------------------------------------------------------------

    def on_message(self, msg: Message) -> None:
        """Fold one message of the running attempt into the record."""
        attempt = self.attempt
        assert attempt is not None
        view, r = attempt.view, self.record.record
        if view.step != r.final_step or view.total_steps != r.total_steps:
            self.record.update(final_step=view.step, total_steps=view.total_steps, save=False)
            self.progress_dirty = True
        if isinstance(msg, CheckpointSaved):
            self.space.checkpoint = msg.bytes
            self.check_space()
            self.record.update(latest_checkpoint=LatestCheckpoint(msg.step, msg.path),
                               save=False)
            current = self.record.current
            if current is not None:
                self.record.update_current(
                    checkpoints_saved=(*current.checkpoints_saved, msg.step),
                    end_step=view.step, save=False)
            # The worker's own event, relayed (marked) so supervisor.jsonl alone tells the
            # night; `overnight logs` shows the worker's line only (morning/runlogs.py).
            self.log.info("checkpoint_saved", step=msg.step, path=msg.path,
                          seconds=msg.seconds, bytes=msg.bytes, attempt=attempt.number,
                          relayed_from="worker")
            self.record.save()
            self.progress_dirty = False
        elif isinstance(msg, EvalResult) and msg.best_step >= 0 \
                and math.isfinite(msg.best_val_loss):  # a NaN is never a best value
            self.record.update(best_checkpoint=self._best(msg.best_step, msg.best_val_loss),
                               save=False)
            self.progress_dirty = True
        elif isinstance(msg, WorkerStopping):
            self.log.info("worker_stopping", reason=msg.reason, detail=msg.detail,
                          exit_code=msg.exit_code, step=msg.step,
                          first_bad_step=msg.first_bad_step, data_lines=msg.data_lines,
                          attempt=attempt.number, relayed_from="worker")

    def check_space(self) -> None:
        """Warn (once per crossing) when the free space will not hold the next checkpoints."""
        low = self.space.check()
        if low is not None:
            self.log.warning(
                "disk_space_low", path=str(low.path), free_bytes=low.free,
                needed_bytes=low.needed, checkpoint_bytes=low.checkpoint,
                keep_last=low.keep_last,
                detail=f"{describe_space(low.path)}: the next {low.keep_last} checkpoints of "
                       f"{human_bytes(low.checkpoint)} and the logs need "
                       f"{human_bytes(low.needed)}; free some space or the run will wait "
                       "for it at its next checkpoint")

    def space_wait(self, now: float) -> float | None:
        """After a disk_full ending: None when a restart may go ahead (enough free space),
        else seconds until the next look (the loop waits; nothing is counted)."""
        self.record.retry()  # run.json may be waiting for space too
        waiting_for = self.space.waiting_for
        ready, free = self.space.ready()
        if ready:
            if waiting_for:
                self.log.info("disk_space_returned", path=str(self.run.root), free_bytes=free,
                              needed_bytes=waiting_for)
            return None
        if now >= self.space.next_waiting_log:
            self.space.next_waiting_log = now + WAITING_LOG_EVERY
            self.log.warning("disk_space_waiting", path=str(self.run.root), free_bytes=free,
                             needed_bytes=waiting_for, poll_s=POLL_SECONDS,
                             detail=f"{describe_space(self.run.root)}; restarting once "
                                    f"{human_bytes(waiting_for)} are free")
        return POLL_SECONDS

    def recycle_due(self, attempt: Attempt) -> str | None:
        """The reason for a planned worker recycle when the running worker has trained the
        policy's `recycle_after` steps (Metal's resource limit, policy.py), else None."""
        every = self.policy.recycle_after
        ran = attempt.view.step - attempt.view.start_step
        if every <= 0 or ran < every:
            return None
        seen = ", ".join(str(n) for n in self.policy.resource_limit_steps[-3:])
        return (f"recycling the worker after {ran} steps, before Metal's resource limit "
                f"(it ended workers after {seen} steps): checkpoint, planned restart")

    def save_progress(self) -> None:
        self.check_space()
        if self.record.current is not None and self.attempt is not None:
            view = self.attempt.view
            self.record.update_current(end_step=view.step,
                                       steps_gained=view.step - view.start_step, save=False)
        self.record.save()
        self.progress_dirty = False

    # ---- end -----------------------------------------------------------------------------

    def finish(self, rc: int, now: float) -> Decision:
        """The attempt ended with return code `rc`: classify, decide what next, record both."""
        attempt = self.attempt
        assert attempt is not None
        group = attempt.proc if isinstance(attempt.proc, GroupProcess) else None
        if group is not None:  # the failed rank's output tells how it failed
            attempt.output = group.failed_output
        else:  # what it left half-written, dealt with before the next checkpoint choice
            clean_up_after(self.run.checkpoints, self.log)
        end = ending.read_end(attempt, rc, now, self.run.metrics_log, self.opts,
                              (free_space(self.run.root)[0], self.space.checkpoint_size()))
        if group is not None:
            end = group_end(group, end)
        decision = self.policy.decide(ending.outcome(attempt, end), self.settings, now)
        if decision.quarantine:
            decision = self._set_refused_aside(attempt, end.classification.detail, decision)
        new = decision.settings or self.settings
        changed = self.settings.diff(new, attempt.lr_scale)
        self.settings = new
        self.record.update(
            rollbacks=self.policy.rollbacks, high_water_step=self.policy.high_water,
            final_step=end.end_step, save=False,
            **({"overrides": new.overrides(self.base_settings)} if changed else {}))
        self._refresh_checkpoints()
        downtime = None
        if self.prev_end_at is not None and attempt.view.first_step_at is not None:
            downtime = round(attempt.view.first_step_at - self.prev_end_at, 3)
        injected = fired_in(marker_dir(self.run.root), attempt.pid)  # faults on purpose
        self.record.end_attempt(**ending.end_fields(attempt, end, decision, changed, downtime),
                                injected=injected, **group_fields(group))
        c = end.classification
        # Levels make `overnight logs --level warning` the list of what went wrong.
        failed = c.failure.is_failure
        (self.log.warning if failed else self.log.info)(
            "worker_exited", attempt=attempt.number, worker_pid=attempt.pid, returncode=rc,
            classification=c.failure.value, detail=c.detail, detected_by=end.detected_by.value,
            detection_latency_s=round(end.latency, 3), step=end.end_step,
            **({"injected": list(injected)} if injected else {}))
        level = ("error" if decision.verdict is Verdict.GIVE_UP
                 else "warning" if failed else "info")
        getattr(self.log, level)(
            "recovery_decision", action=decision.action, verdict=decision.verdict.value,
            reason=decision.reason, delay_s=round(decision.delay, 3), settings_changed=changed)
        if decision.action == "wait_for_space":
            self.space.start_waiting(end.end_step)
            self.space.next_waiting_log = 0.0
        self.pending = decision
        self.prev_end_at = now
        self.attempt = None
        return decision

    def note_complete(self) -> AlreadyComplete:
        """The run was complete when this supervisor started (`overnight train` finished it,
        or an earlier supervisor did): run.json gets its final step, total steps and best
        checkpoint from COMPLETE (worker/finish.py) and the checkpoints — not "step 0 / 0" —
        and the event says whether it had finished or early-stopped."""
        r = self.record.record
        done = read_marker(self.run) or {}  # unreadable: what run.json knows
        self._refresh_checkpoints()
        step, total = done.get("step"), done.get("total_steps")
        best_step, best_val = done.get("best_step"), done.get("best_val_loss")
        fields: dict[str, Any] = {}
        if isinstance(step, int) and not isinstance(step, bool):
            fields.update(final_step=step, high_water_step=max(r.high_water_step, step))
        if isinstance(total, int) and not isinstance(total, bool):
            fields["total_steps"] = total
        if isinstance(best_step, int) and best_step >= 0 and isinstance(best_val, (int, float)) \
                and math.isfinite(best_val):
            fields["best_checkpoint"] = self._best(best_step, float(best_val))
        self.record.update(save=False, **fields)
        status = done.get("status")
        stopped = status == "early_stopped" if status else r.state is State.EARLY_STOPPED
        r = self.record.record
        how = "early-stopped" if stopped else "finished"
        more = more_iters_asked(done, self.config.iters, self.run)
        return AlreadyComplete(stopped, f"the run was already complete ({how} at step "
                                        f"{r.final_step} of {r.total_steps})"
                                        + (f"; {more}" if more else ""))

    def _refresh_checkpoints(self) -> None:
        """latest/best checkpoint from disk (shallow validation: manifest, sizes, state)."""
        for info in list_checkpoints(self.run.checkpoints):
            v = validate(info.path, deep=False)
            if not v.ok or v.state is None:
                continue
            best = v.state.best
            fields: dict[str, Any] = {
                "latest_checkpoint": LatestCheckpoint(info.step, str(info.path))}
            if best.step >= 0 and best.val_loss is not None:
                fields["best_checkpoint"] = self._best(best.step, best.val_loss)
            self.record.update(save=False, **fields)
            return

    def _best(self, step: int, val_loss: float) -> BestCheckpoint:
        path = self.run.checkpoint_dir(step)
        return BestCheckpoint(step, str(path) if path.is_dir() else None, val_loss)
