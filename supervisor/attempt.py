"""One worker attempt from start to end: choose and validate the checkpoint, build the command
line, spawn, watch, stop, classify the end, ask the policy, and keep the run record.

The loop (supervisor/loop.py) decides *when*; this module knows *how*.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

from shared.checkpoint import CheckpointInfo, list_checkpoints, newest_valid, quarantine, validate
from shared.config import Config
from shared.exitcodes import FailureClass
from shared.layout import RunDir
from shared.protocol import CheckpointSaved, EvalResult, Message, WorkerStopping
from supervisor.classify import ExitFacts, classify
from supervisor.memory import MemoryWatch, Sample
from supervisor.policy import Decision, Outcome, Policy, Settings
from supervisor.record import RunRecord, now_iso
from supervisor.spawn import Spawner, WorkerProcess
from supervisor.state import State, StopReason, Verdict
from supervisor.watch import AttemptView

NORMAL_ENDS = frozenset({FailureClass.COMPLETED, FailureClass.EARLY_STOPPED,
                         FailureClass.GRACEFUL_STOP, FailureClass.PLANNED_RESTART})

TAIL_BYTES = 8192
TAIL_LINES = 40


class AttemptRunner:
    def __init__(
        self, *, config: Config, config_path: Path, run: RunDir, record: RunRecord,
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
        stored = record.data.get("overrides") or {}
        self.settings = Settings.from_dict({**base.to_dict(), **stored}) if stored else base
        self.base_settings = base
        for a in record.attempts:  # a restarted supervisor knows which batches were non-finite
            bad = a.get("bad_data") or {}
            if a.get("classification") == "non_finite" and isinstance(bad.get("batch"), int) \
                    and bad["batch"] >= 0:
                policy.nonfinite_batches.setdefault(bad["batch"], float(bad.get("lr_scale", 1.0)))
        self.proc: WorkerProcess | None = None
        self.view: AttemptView | None = None
        self.mem: MemoryWatch | None = None
        self.pending: Decision | None = None  # the decision that asked for the next attempt
        self.prev_end_at: float | None = None
        self.progress_dirty = False
        self._reset_stop()

    def _reset_stop(self) -> None:
        self.stop_reason: StopReason | None = None
        self.user_stop = False
        self.stop_deadline: float | None = None
        self.stop_started: float | None = None
        self.killed = False
        self.detection: tuple[str, str, float] | None = None

    # ---- start ---------------------------------------------------------------------------

    def start(self, now: float) -> tuple[int, int]:
        """Validate checkpoints, spawn the next attempt; returns (attempt, pid)."""
        found = self._choose_checkpoint()
        n = len(self.record.attempts) + 1
        argv = [*self.command, "train", str(self.config_path), "--run-dir", str(self.run.root),
                "--telemetry", self.run.telemetry_endpoint, "--attempt", str(n),
                "--run-id", self.record.run_id]
        start_step, lr_in_ckpt = 0, None
        if found is not None:
            info, state = found
            argv += ["--resume", str(info.path)]
            start_step, lr_in_ckpt = info.step, state.get("lr_scale")
        else:
            # Not --fresh: that would move the run's history aside. Every checkpoint the
            # worker could find was quarantined above, so it starts from scratch.
            argv += ["--resume", "auto"]
        for key, value in self.settings.to_dict().items():
            if key not in ("lr_scale", "skip_batches") and value != getattr(self.base_settings,
                                                                            key):
                text = str(value).lower() if isinstance(value, bool) else str(value)
                argv += ["--set", f"{key}={text}"]
        if self.settings.lr_scale is not None:
            argv += ["--lr-scale", repr(self.settings.lr_scale)]
        for batch in self.settings.skip_batches:
            argv += ["--skip-batch", str(batch)]
        skip = 0
        if self.pending is not None and self.pending.skip_through_position >= 0:
            # Data positions, not steps: earlier skips put the position ahead of the step.
            at = int(found[1].get("data_position", start_step)) if found is not None else 0
            skip = max(0, self.pending.skip_through_position + 1 - at)
        elif self.pending is not None and self.pending.bad_until >= 0:
            skip = max(1, self.pending.bad_until - start_step)
        if skip:
            argv += ["--skip-steps", str(skip)]
        output = self.run.attempt_output(n)
        proc = self.spawner.spawn(argv, self.env, output)
        self.proc = proc
        self.view = AttemptView(n, proc.pid, now, start_step)
        self.mem = MemoryWatch(self.opts, start_step=start_step)
        self.lr_in_effect = float(self.settings.lr_scale or lr_in_ckpt or 1.0)
        self._reset_stop()
        reason = self.pending.reason if self.pending is not None else "initial"
        self.log.info("worker_spawned", attempt=n, worker_pid=proc.pid, argv=argv,
                      resume_step=start_step if found else None, skip_steps=skip,
                      settings=self.settings.to_dict(), log_file=str(output))
        self.record.data["final_step"] = start_step
        self.record.begin_attempt(
            {
                "attempt": n, "pid": proc.pid, "argv": argv,
                "log": str(output.relative_to(self.run.root)), "started": now_iso(),
                "ended": None, "start_reason": reason,
                "resumed_from": {"step": info.step, "path": str(info.path)} if found else None,
                "skip_steps": skip, "lr_scale": self.settings.lr_scale,
                "settings": self.settings.to_dict(), "start_step": start_step,
                "end_step": start_step, "steps_gained": 0, "checkpoints_saved": [],
            },
            {"pid": proc.pid, "attempt": n, "started": now_iso(), "argv": argv},
        )
        return n, proc.pid

    def _choose_checkpoint(self) -> tuple[CheckpointInfo, dict[str, Any]] | None:
        before = self.pending.rollback_before if self.pending is not None else None
        found = newest_valid(self.run.checkpoints, self._quarantine, before_step=before)
        if before is not None:
            keep = found[0].step if found is not None else -1
            for info in list_checkpoints(self.run.checkpoints):
                if info.step > keep:
                    self._quarantine(
                        info, f"set aside by a rollback: after the resume point (step {keep}) "
                        f"and at or after the first bad step {before}",
                    )
        if found is None:
            self.log.info("checkpoint_none_valid", action="start fresh")
        else:
            self.log.info("checkpoint_validated", step=found[0].step, path=str(found[0].path))
        return found

    def _quarantine(self, info: CheckpointInfo, reason: str) -> None:
        moved = quarantine(info, self.run.quarantine)
        self.log.warning("checkpoint_quarantined", checkpoint=info.path.name, reason=reason,
                         moved_to=str(moved))
        self.record.note_quarantine(info.path.name, moved, reason)

    # ---- while it runs -------------------------------------------------------------------

    def poll(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def on_message(self, msg: Message) -> None:
        d = self.record.data
        view = self.view
        assert view is not None
        if view.step != d.get("final_step") or view.total_steps != d.get("total_steps"):
            d["final_step"], d["total_steps"] = view.step, view.total_steps
            self.progress_dirty = True
        if isinstance(msg, CheckpointSaved):
            d["latest_checkpoint"] = {"step": msg.step, "path": msg.path}
            current = self.record.current
            if current is not None:
                current["checkpoints_saved"].append(msg.step)
                current["end_step"] = view.step
            self.log.info("checkpoint_saved", step=msg.step, path=msg.path,
                          seconds=msg.seconds, bytes=msg.bytes)
            self.record.save()
            self.progress_dirty = False
        elif isinstance(msg, EvalResult) and msg.best_step >= 0 \
                and math.isfinite(msg.best_val_loss):  # a NaN is never a best value
            path = self.run.checkpoint_dir(msg.best_step)
            d["best_checkpoint"] = {"step": msg.best_step, "val_loss": msg.best_val_loss,
                                    "path": str(path) if path.is_dir() else None}
            self.progress_dirty = True
        elif isinstance(msg, WorkerStopping):
            self.log.info("worker_stopping", reason=msg.reason, detail=msg.detail,
                          exit_code=msg.exit_code, step=msg.step,
                          first_bad_step=msg.first_bad_step, data_lines=msg.data_lines)

    def save_progress(self) -> None:
        current = self.record.current
        if current is not None and self.view is not None:
            current["end_step"] = self.view.step
            current["steps_gained"] = self.view.step - self.view.start_step
        self.record.save()
        self.progress_dirty = False

    def add_sample(self, s: Sample) -> str | None:
        return self.mem.add(s) if self.mem is not None else None

    def note_detection(self, kind: str, detail: str, seconds: float) -> None:
        by = {"hang": "heartbeat_timeout", "stall": "stall_timeout"}.get(kind, kind)
        self.detection = (by, detail, seconds)
        self.log.warning("worker_unhealthy", kind=kind, detail=detail)

    def terminate(self, reason: StopReason, now: float) -> None:
        """SIGTERM (the worker checkpoints and exits) + SIGCONT (a stopped process wakes)."""
        if reason is StopReason.USER:
            self.user_stop = True
            if self.detection is None:
                self.detection = ("stop_request", "stop requested", 0.0)
        if self.stop_reason is not None or self.proc is None:
            return  # already stopping: keep the first reason and deadline
        self.stop_reason = reason
        self.stop_started = now
        self.stop_deadline = now + self.opts.stop_timeout
        self.proc.signal(signal.SIGTERM)
        self.proc.signal_group(signal.SIGCONT)
        self.log.info("worker_terminate", reason=reason.value, worker_pid=self.proc.pid,
                      stop_timeout=self.opts.stop_timeout)

    def stop_overdue(self, now: float) -> float | None:
        if self.stop_deadline is None or self.killed or now < self.stop_deadline:
            return None
        return now - (self.stop_started or now)

    def kill(self) -> None:
        if self.proc is None:
            return
        self.killed = True
        self.log.warning("worker_kill", worker_pid=self.proc.pid,
                         waited_s=self.opts.stop_timeout)
        self.proc.signal_group(signal.SIGKILL)

    def request_checkpoint(self) -> None:
        if self.proc is not None:
            self.proc.signal(signal.SIGUSR1)

    # ---- end -----------------------------------------------------------------------------

    def finish(self, rc: int, now: float) -> Decision:
        """Classify the ended attempt, decide what next, record both."""
        view, mem = self.view, self.mem
        assert view is not None and mem is not None and self.proc is not None
        output = self.run.attempt_output(view.attempt)
        tail = stderr_tail(output)
        stopping = view.stopping if isinstance(view.stopping, WorkerStopping) else None
        last = mem.last
        by, detail, latency = self.detection or ("exit", "", _since_last_sign(view, output, now))
        c = classify(ExitFacts(
            returncode=rc, stop_reason=self.stop_reason, killed_by_supervisor=self.killed,
            stopping_reason=stopping.reason if stopping else "",
            stopping_detail=stopping.detail if stopping else "",
            first_bad_step=stopping.first_bad_step if stopping else -1,
            data_position=stopping.data_position if stopping else -1,
            data_batch=stopping.data_batch if stopping else -1,
            data_lines=stopping.data_lines if stopping else "",
            stderr_tail=tail, memory_mb=last.worker_mb if last else view.active_mb,
            memory_limit_mb=self.opts.memory_limit_mb,
            available_fraction=last.available_fraction if last else 1.0, stop_detail=detail,
        ))
        # Telemetry goes out in batches and dies with the process: the worker's own metrics
        # file (written every step) knows the last step for sure.
        end_step = max(view.step, stopping.step if stopping else 0,
                       last_logged_step(self.run.metrics_log, view.attempt))
        outcome = Outcome(c.failure, c.detail, view.start_step, end_step, c.first_bad_step,
                          self.user_stop, self.lr_in_effect, c.data_position, c.data_batch,
                          c.data_lines)
        decision = self.policy.decide(outcome, self.settings, now)
        new = decision.settings or self.settings
        changed = self.settings.diff(new)
        self.settings = new
        if changed:
            self.record.data["overrides"] = new.to_dict()
        self.record.data["rollbacks"] = self.policy.rollbacks
        self.record.data["high_water_step"] = self.policy.high_water
        self.record.data["final_step"] = end_step
        self._refresh_checkpoints()
        downtime = None
        if self.prev_end_at is not None and view.first_step_at is not None:
            downtime = round(view.first_step_at - self.prev_end_at, 3)
        fields = {
            "end_step": end_step, "steps_gained": end_step - view.start_step,
            "exit_code": c.exit_code, "signal": c.signal, "signal_name": c.signal_name,
            "classification": c.failure.value, "detail": c.detail, "detected_by": by,
            "detection_latency_s": round(latency, 3), "killed_after_stop_timeout": self.killed,
            "time_to_first_heartbeat_s": _since(view.first_heartbeat_at, view.spawned_at),
            "time_to_first_step_s": _since(view.first_step_at, view.spawned_at),
            "downtime_s": downtime, "tokens": view.tokens,
            "tokens_per_sec_avg": _round(view.tokens_per_sec),
            "peak_rss_mb": round(mem.peak_rss_mb, 1),
            "peak_mlx_mb": round(max(mem.peak_mlx_mb, view.peak_mlx_mb), 1),
            "min_available_mb": _round(mem.min_available_mb),
            "stderr_tail": tail, "action": decision.action, "action_reason": decision.reason,
            "restart_delay_s": round(decision.delay, 3) if decision.verdict.value == "restart"
            else None,
            "settings_changed": changed,
            "bad_data": {"position": c.data_position, "batch": c.data_batch,
                         "lines": c.data_lines, "lr_scale": self.lr_in_effect}
            if c.data_position >= 0 else None,
        }
        self.record.end_attempt(fields)
        # Levels make `overnight logs --level warning` the list of what went wrong.
        failed = c.failure not in NORMAL_ENDS
        (self.log.warning if failed else self.log.info)(
            "worker_exited", attempt=view.attempt, worker_pid=self.proc.pid, returncode=rc,
            classification=c.failure.value, detail=c.detail, detected_by=by,
            detection_latency_s=round(latency, 3), step=end_step)
        level = ("error" if decision.verdict is Verdict.GIVE_UP
                 else "warning" if failed else "info")
        getattr(self.log, level)(
            "recovery_decision", action=decision.action, verdict=decision.verdict.value,
            reason=decision.reason, delay_s=round(decision.delay, 3), settings_changed=changed)
        self.pending = decision
        self.prev_end_at = now
        self.proc = None
        self._reset_stop()
        return decision

    def _refresh_checkpoints(self) -> None:
        """latest/best checkpoint from disk (shallow validation: manifest and sizes)."""
        d = self.record.data
        for info in list_checkpoints(self.run.checkpoints):
            v = validate(info.path, deep=False)
            if not v.ok or v.state is None:
                continue
            d["latest_checkpoint"] = {"step": info.step, "path": str(info.path)}
            best = v.state.get("best") or {}
            step = best.get("step")
            if isinstance(step, int) and best.get("val_loss") is not None:
                path = self.run.checkpoint_dir(step)
                d["best_checkpoint"] = {"step": step, "val_loss": best["val_loss"],
                                        "path": str(path) if path.is_dir() else None}
            return

    def status(self, state: State, restart_at: float | None, now: float) -> dict[str, Any]:
        d = self.record.data
        view = self.view if state.has_worker else None
        best = d.get("best_checkpoint")
        if best and not best.get("path") and self.run.checkpoint_dir(best["step"]).is_dir():
            best["path"] = str(self.run.checkpoint_dir(best["step"]))
        return {
            "run_id": d["run_id"], "run_dir": str(self.run.root), "state": state.value,
            "reason": d.get("reason", ""), "supervisor_pid": self.supervisor_pid,
            "worker_pid": view.pid if view else None, "attempt": len(self.record.attempts),
            "phase": view.phase.value if view else None,
            "step": view.step if view else d.get("final_step"),
            "total_steps": d.get("total_steps"),
            "last_heartbeat_s": round(now - view.last_seen, 2) if view else None,
            "tokens_per_sec": _round(view.tokens_per_sec) if view else None,
            "rss_mb": _round(view.rss_mb) if view else None,
            "mlx_mb": _round(view.active_mb) if view else None,
            "overrides": d.get("overrides", {}), "latest_checkpoint": d.get("latest_checkpoint"),
            "best_checkpoint": d.get("best_checkpoint"),
            "restart_in_s": round(restart_at - now, 1) if restart_at is not None else None,
            "attempts": len(self.record.attempts),
            "failures": self.record.data.get("totals", {}).get("failures", 0),
        }


def stderr_tail(path: Path) -> str:
    """The last lines of an attempt's output file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - TAIL_BYTES))
            data = f.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", "replace").splitlines()
    return "\n".join(lines[-TAIL_LINES:])


def _since_last_sign(view: AttemptView, output: Path, now: float) -> float:
    """Seconds since the worker's last sign of life: its last message or its last output."""
    latency = now - view.last_seen
    with contextlib.suppress(OSError):
        latency = min(latency, max(0.0, time.time() - output.stat().st_mtime))
    return latency


def _since(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 3)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def last_logged_step(metrics_log: Path, attempt: int, tail_bytes: int = 65536) -> int:
    """The last step this attempt wrote to logs/metrics.jsonl (0 if none); reads the tail."""
    try:
        with open(metrics_log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for raw in reversed(lines):
        try:
            m = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # the first (cut) or a half-written last line
        if isinstance(m, dict) and m.get("attempt") == attempt and isinstance(m.get("step"), int):
            return int(m["step"])
    return 0

