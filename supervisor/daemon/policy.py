"""The recovery policy: given how an attempt ended, restart (how, with what, after how long),
finish, or give up — and say why. Pure: the clock value and the random source are passed in.

| class                          | action                                                      |
|--------------------------------|-------------------------------------------------------------|
| completed / early_stopped      | finish / early-stop                                         |
| graceful_stop, or user stop    | stop                                                        |
| bad_config                     | give up at once with the worker's message                   |
| crash, hang, stall             | restart, same settings                                      |
| gpu_watchdog                   | restart, same settings; the report says: let the display sleep |
|                                | (gpu_watchdog_mitigation: after gpu_watchdog_cooldown)      |
| metal_resource_limit           | restart, same settings (a buffer count, not memory: a       |
|                                | smaller batch does not help); when it recurs after a similar |
|                                | number of steps, recycle every worker (planned restart after |
|                                | a checkpoint) at 80 % of that count (`recycle_after`)       |
| battery_pause                  | wait for AC (supervisor/daemon/powerwatch.py), then restart; |
|                                | not a failure, no budget                                    |
| oom                            | restart with half the micro-batch and twice the accumulation |
|                                | (same effective batch); at micro-batch 1 gradient           |
|                                | checkpointing; after that give up                           |
| non_finite / grad_spike        | roll back before the first bad step, lr_scale *= lr_backoff, |
|                                | skip the offending data once (below); give up after          |
|                                | max_rollbacks                                               |
| non_finite on a batch that was | a data problem, not divergence: skip that batch in every    |
| non-finite before              | epoch (`--skip-batch`), undo the lr cut it caused, roll back |
|                                | to the newest checkpoint before it; not a rollback          |
| planned_restart (memory)       | restart at once, not counted as a failure                   |
| checkpoint_refused             | quarantine the checkpoint the worker refused, restart at    |
|                                | once from the next older valid one (a rollback's constraints |
|                                | kept); not counted: refusals end when checkpoints do; the   |
|                                | same checkpoint refused twice gives up                      |
| disk_full                      | wait until the run's file system has room for a checkpoint  |
|                                | (supervisor/daemon/diskspace.py), then restart; not counted |
|                                | against any budget, no backoff step                         |
| system_limit                   | give up at once with the reason (e.g. the open-file limit)  |

Budgets count progress, not only failures: an attempt *progressed* when it reached a step
the run never reached before (the high-water mark: the highest step in logs/metrics.jsonl,
which the worker writes every step — supervisor/daemon/ending.py — never the newest
checkpoint, which can be a whole `save_every` behind). Failures since the last progress are
kept; `max_failures` of them within `failure_window` seconds give up (crash loop).
A failure is *deterministic* — give up at once — only when it repeats exactly: the same
class at the same step (the worker's first bad step, else the last step it reached) with
the same settings, twice in a row. Two kills inside one checkpoint interval land at two
different steps and are not that. A kill from outside (`EXTERNAL_SIGNALS`: SIGKILL that
classify.py did not attribute to OOM, SIGTERM/SIGINT/SIGHUP/SIGQUIT before the worker's
handlers are in place) says nothing about the training, wherever it lands: only the
crash-loop budget bounds those. The backoff grows exponentially (with +-20 % jitter) per
failure without progress and resets after an attempt gained `progress_reset_steps` steps.

Data, not divergence. The worker names the batch of a non-finite step: its data position,
its group in the epoch plan (`data_batch`, the same group in every epoch) and the file
lines. The first time, nothing tells a bad batch from divergence, so it is a rollback. When
the same batch is non-finite again — right after the rollback or in a later epoch — it is
the data: lowering the learning rate again would only slow the night down and, after
max_rollbacks, end it. The policy skips that batch for the rest of the run instead and
restores the learning rate the misdiagnosed rollback cut.

The offending data of a rollback, skipped once (`skip_positions`: data positions, not
steps, so earlier skips that moved the position ahead of the step do not matter):
- non-finite loss or gradient: the failing batch alone (the worker names its position).
  The healthy batches between the rollback checkpoint and it are trained again, at the
  lower rate: every example is trained on in every epoch;
- gradient spike: the spike window, the `grad_spike.patience` consecutive steps whose norm
  was a spike (positions `first_bad_position` .. `data_position` from the worker). Which of
  them caused it cannot be told apart, and the window is short; the batches before it are
  trained again.
The positions are kept in `Settings` (run.json "overrides"), so a later restart from a
checkpoint before them — a crash before the worker got there, a restarted supervisor —
still passes over them; positions behind a checkpoint mean nothing to it. Only when the
worker named no position (its last message was lost) the data is skipped by steps, from the
rollback checkpoint through the failing step, as before (`bad_until`, `--skip-steps`).

Longer than 400 lines: the table above is one decision, and its budgets, repeats and recycle
point are state the cases share.
"""

from __future__ import annotations

import dataclasses
import random
import signal
from dataclasses import dataclass, field
from typing import Any

from shared.config import SupervisorOptions
from shared.exitcodes import FailureClass
from supervisor.daemon.state import Verdict

# Signals a worker does not raise on itself: something outside ended it (a person, a script,
# the kernel's OOM killer when memory was not near the limit), not the training.
EXTERNAL_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                              signal.SIGQUIT})
RESTARTED_SAME = frozenset(
    {FailureClass.CRASH, FailureClass.HANG, FailureClass.STALL, FailureClass.GPU_WATCHDOG,
     FailureClass.MACHINE_RESTARTED}
)
# Two resource-limit endings are "at a similar step count" when the smaller number of steps
# the worker ran is at least this fraction of the larger; the recycle point is RECYCLE_AT of
# the smaller (a margin: the buffer count also grows with evaluations and checkpoints).
SIMILAR_STEPS = 2 / 3
RECYCLE_AT = 0.8
ROLLBACK = frozenset({FailureClass.NON_FINITE, FailureClass.GRAD_SPIKE})
GPU_WATCHDOG_ADVICE = (
    "the macOS GPU watchdog kills long GPU command buffers while the display is on; let the "
    "display sleep (the supervisor never holds a display-awake assertion, only "
    "`caffeinate -i`) or shorten steps (smaller batch_size or max_seq_length)"
)


@dataclass(frozen=True)
class Settings:
    """Worker settings the supervisor changes and persists (run.json "overrides")."""

    batch_size: int
    grad_accumulation_steps: int
    grad_checkpoint: bool
    lr_scale: float | None = None  # None: whatever the checkpoint (or 1.0) says
    skip_batches: tuple[int, ...] = ()  # epoch-plan batches never trained on (data problems)
    skip_positions: tuple[int, ...] = ()  # data positions passed over once (rollbacks)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip_batches"] = list(self.skip_batches)
        d["skip_positions"] = list(self.skip_positions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        return cls(
            int(d["batch_size"]), int(d["grad_accumulation_steps"]), bool(d["grad_checkpoint"]),
            None if d.get("lr_scale") is None else float(d["lr_scale"]),
            tuple(sorted(int(b) for b in d.get("skip_batches") or ())),
            tuple(sorted(int(p) for p in d.get("skip_positions") or ())),
        )

    def diff(self, other: Settings, lr_scale: float | None = None) -> dict[str, Any]:
        """{key: [old, new]} for each setting that differs in `other` (an attempt's
        "settings_changed"). `lr_scale`: the scale the attempt ran with, shown for our
        lr_scale None ("the checkpoint's"): `lr_scale: [1.0, 0.5]`, not `[None, 0.5]`."""
        a, b = self.to_dict(), other.to_dict()
        for d in (a, b):
            if d["lr_scale"] is None and lr_scale is not None:
                d["lr_scale"] = lr_scale
        return {k: [a[k], b[k]] for k in a if a[k] != b[k]}

    def overrides(self, base: Settings) -> dict[str, Any]:
        """The settings that differ from `base` (the config's), as run.json "overrides"
        keeps them: only what the supervisor changed; `from_dict({**base, **overrides})`
        gives these settings back."""
        mine, theirs = self.to_dict(), base.to_dict()
        return {k: v for k, v in mine.items() if v != theirs[k]}


@dataclass(frozen=True)
class Outcome:
    """What the policy needs to know about the attempt that ended."""

    failure: FailureClass
    detail: str
    start_step: int  # the step it resumed from
    end_step: int  # the last step it reported
    first_bad_step: int = -1
    stop_requested: bool = False  # the user (or a signal) asked the supervisor to stop
    lr_scale: float = 1.0  # the learning-rate scale in effect during the attempt
    data_position: int = -1  # the failing step's batch (WorkerStopping): its data position,
    data_batch: int = -1  # its group in the epoch plan (the same in every epoch)
    data_lines: str = ""  # and its file lines, e.g. "train.jsonl:3,8-11"
    first_bad_position: int = -1  # a spike: the data position of its window's first step
    signal: int | None = None  # the signal that ended it (Popen's -N), None: it exited
    stop_note: str = ""  # why the stop was requested, when the requester said

    @property
    def failed_at(self) -> int:
        """The step it failed at: the first bad step the worker named, else the last step."""
        return self.first_bad_step if self.first_bad_step >= 0 else self.end_step

    @property
    def killed_from_outside(self) -> bool:
        """Ended by a signal a worker does not raise on itself, and not classified as OOM."""
        return (self.failure is FailureClass.CRASH and self.signal is not None
                and self.signal in EXTERNAL_SIGNALS)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    action: str  # finish, early_stop, stop, give_up, restart, reduce_batch, rollback, ...
    reason: str
    delay: float = 0.0
    settings: Settings | None = None  # the settings for the next attempt
    rollback_before: int | None = None  # resume from a checkpoint with step < this
    bad_until: int = -1  # no position named: skip data up to and including this step
    counted: bool = False  # counted as a failure against the budgets
    quarantine: bool = False  # quarantine the checkpoint the attempt resumed from
    recycle_after: int = 0  # >0: a planned restart once a worker has run this many steps


@dataclass
class Policy:
    opts: SupervisorOptions
    rng: random.Random = field(default_factory=random.Random)
    high_water: int = 0  # highest step the run ever reached
    rollbacks: int = 0
    failures: list[float] = field(default_factory=list)  # times of failures since progress
    # the last failure since progress: (class, settings, the step it failed at)
    last_failure: tuple[FailureClass, Settings, int] | None = None
    streak: int = 0  # consecutive failures without sustained progress (backoff exponent)
    # epoch-plan batch -> lr_scale in effect when it was first non-finite
    nonfinite_batches: dict[int, float] = field(default_factory=dict)
    # steps each worker ran before Metal's resource limit ended it; the recycle point (0: none)
    resource_limit_steps: list[int] = field(default_factory=list)
    recycle_after: int = 0

    def decide(self, o: Outcome, settings: Settings, now: float) -> Decision:
        progressed = o.end_step > self.high_water
        self.high_water = max(self.high_water, o.end_step)
        if progressed:
            self.failures.clear()
            self.last_failure = None
        if o.end_step - o.start_step >= self.opts.progress_reset_steps:
            self.streak = 0

        f = o.failure
        if f is FailureClass.COMPLETED:
            return Decision(Verdict.FINISH, "finish", "all steps done")
        if f is FailureClass.EARLY_STOPPED:
            return Decision(Verdict.EARLY_STOP, "early_stop", f"early stopping: {o.detail}")
        if o.stop_requested:
            why = f": {o.stop_note}" if o.stop_note else ""
            return Decision(Verdict.STOP, "stop", f"stopped on request{why} ({o.detail})")
        if f is FailureClass.GRACEFUL_STOP:
            return Decision(Verdict.STOP, "stop", f"worker stopped gracefully ({o.detail})")
        if f is FailureClass.BAD_CONFIG:
            return Decision(Verdict.GIVE_UP, "give_up", f"bad config or data: {o.detail}")
        if f is FailureClass.SYSTEM_LIMIT:  # every worker would fail the same way at start
            return Decision(Verdict.GIVE_UP, "give_up", f"system limit: {o.detail}")
        if f is FailureClass.BATTERY_PAUSE:  # not a failure: wait for AC, count nothing
            return Decision(Verdict.RESTART, "wait_for_power",
                            f"paused on battery: {o.detail}; resuming on AC power (not "
                            "counted against the restart budgets)", 0.0, settings,
                            recycle_after=self.recycle_after)
        if f is FailureClass.DISK_FULL:  # not the training's fault: wait, count nothing
            full = o.detail if o.detail.startswith("disk full") else f"disk full: {o.detail}"
            return Decision(Verdict.RESTART, "wait_for_space",
                            f"{full}; waiting for free space before restarting (not counted "
                            "against the restart budgets)", 0.0, settings)

        repeated = self._repeated(o, settings, progressed)
        if repeated:
            return repeated
        # A kill from outside is no evidence about the training: not the first of a repeat.
        self.last_failure = None if o.killed_from_outside else (f, settings, o.failed_at)

        if f is FailureClass.PLANNED_RESTART:
            return Decision(Verdict.RESTART, "planned_restart", o.detail, 0.0, settings,
                            recycle_after=self.recycle_after)
        if f is FailureClass.CHECKPOINT_REFUSED:  # the checkpoint's fault, not the training's
            return Decision(
                Verdict.RESTART, "quarantine_checkpoint",
                f"{f.value}: {o.detail}; it is quarantined, the run resumes from the next "
                "older valid checkpoint", 0.0, settings, quarantine=True)

        self.failures = [t for t in self.failures if now - t <= self.opts.failure_window]
        self.failures.append(now)
        if len(self.failures) >= self.opts.max_failures:
            return Decision(
                Verdict.GIVE_UP, "give_up",
                f"crash loop: {len(self.failures)} failures within "
                f"{self.opts.failure_window:.0f} s without progress (last: {f.value}: {o.detail})",
                counted=True,
            )
        delay = self._backoff()
        if f is FailureClass.NON_FINITE and o.data_batch in self.nonfinite_batches:
            return self._skip_batch(o, settings, delay)
        if f in ROLLBACK:
            return self._rollback(o, settings, delay)
        if f is FailureClass.OOM:
            return self._shrink(o, settings, delay)
        if f is FailureClass.METAL_RESOURCE_LIMIT:
            return self._resource_limit(o, settings, delay)
        if f in RESTARTED_SAME:
            why = f"{f.value}: {o.detail}"
            if f is FailureClass.GPU_WATCHDOG:
                why = f"{why}; {GPU_WATCHDOG_ADVICE}"
                if self.opts.gpu_watchdog_mitigation and delay < self.opts.gpu_watchdog_cooldown:
                    delay = self.opts.gpu_watchdog_cooldown
                    why = f"{why}; cooling down {delay:.0f} s first (gpu_watchdog_mitigation)"
            return Decision(Verdict.RESTART, "restart", why, delay, settings, counted=True,
                            recycle_after=self.recycle_after)
        raise ValueError(f"expected a known failure class, got {f!r}")  # pragma: no cover

    def _resource_limit(self, o: Outcome, settings: Settings, delay: float) -> Decision:
        """Metal's buffer-count limit: restart unchanged; when it recurs after a similar number
        of steps, recycle every worker before that point (module docstring)."""
        why = (f"{o.failure.value}: {o.detail}; restarting with the same settings "
               "(clear_cache_threshold slows the buffer count's growth)")
        why += self.note_resource_limit(max(1, o.end_step - o.start_step))
        return Decision(Verdict.RESTART, "restart", why, delay, settings, counted=True,
                        recycle_after=self.recycle_after)

    def note_resource_limit(self, ran: int) -> str:
        """A worker that ran `ran` steps ended at Metal's resource limit: update the recycle
        point; what changed, as a clause ("" for nothing). Also replays run.json's attempts
        when a supervisor restarts (supervisor/daemon/runner.py)."""
        earlier = self.resource_limit_steps[-1] if self.resource_limit_steps else None
        self.resource_limit_steps.append(ran)
        if self.recycle_after and ran <= self.recycle_after:  # the recycle came too late
            self.recycle_after = max(1, int(ran * RECYCLE_AT))
            return (f"; it came after {ran} steps, before the recycle point: recycling "
                    f"workers after {self.recycle_after} steps from now on")
        if earlier is not None and min(ran, earlier) >= SIMILAR_STEPS * max(ran, earlier):
            self.recycle_after = max(1, int(min(ran, earlier) * RECYCLE_AT))
            return (f"; it recurred after a similar number of steps ({earlier}, then {ran}): "
                    f"each worker is recycled (checkpoint, planned restart) after "
                    f"{self.recycle_after} steps")
        return ""

    def _repeated(self, o: Outcome, settings: Settings, progressed: bool) -> Decision | None:
        """Give up when this failure repeats the last one exactly (module docstring). Not
        Metal's resource limit: a count that grows with the worker's age is expected to end
        it at about the same step after a restart from the same checkpoint; the recycle is
        the answer, and the crash-loop budget the bound."""
        if o.failure is FailureClass.METAL_RESOURCE_LIMIT:
            return None
        if progressed or o.killed_from_outside \
                or self.last_failure != (o.failure, settings, o.failed_at):
            return None
        return Decision(
            Verdict.GIVE_UP, "give_up",
            f"the same failure ({o.failure.value}) twice at step {o.failed_at} with the same "
            f"settings, without progress: deterministic, not restarting ({o.detail})",
            counted=True,
        )

    def _backoff(self) -> float:
        self.streak += 1
        base = min(self.opts.backoff_max, self.opts.backoff_initial * 2 ** (self.streak - 1))
        return float(min(self.opts.backoff_max, base * self.rng.uniform(0.8, 1.2)))

    def _rollback(self, o: Outcome, settings: Settings, delay: float) -> Decision:
        self.rollbacks += 1
        if self.rollbacks > self.opts.max_rollbacks:
            return Decision(
                Verdict.GIVE_UP, "give_up",
                f"{o.failure.value} after {self.opts.max_rollbacks} rollbacks: {o.detail}",
                counted=True,
            )
        first_bad = o.first_bad_step if o.first_bad_step >= 0 else o.end_step
        lr_scale = round(o.lr_scale * self.opts.lr_backoff, 12)
        skip = offending_positions(o)
        new = dataclasses.replace(
            settings, lr_scale=lr_scale,
            skip_positions=tuple(sorted({*settings.skip_positions, *skip})))
        if o.failure is FailureClass.NON_FINITE and o.data_batch >= 0:
            self.nonfinite_batches.setdefault(o.data_batch, o.lr_scale)
        if skip:
            where = (f"data position {skip[0]}" if len(skip) == 1 else
                     f"the spike window's data positions {skip[0]}-{skip[-1]}")
            skipping = (f"skipping {where} once ({o.data_lines}); the batches before it are "
                        "trained again")
        else:
            skipping = f"skipping data through step {max(first_bad, o.end_step)}"
        return Decision(
            Verdict.RESTART, "rollback",
            f"{o.failure.value}: {o.detail}; rollback {self.rollbacks}/{self.opts.max_rollbacks} "
            f"to before step {first_bad}, lr_scale {o.lr_scale:g} -> {lr_scale:g}, {skipping}",
            delay, new, rollback_before=first_bad,
            bad_until=-1 if skip else max(first_bad, o.end_step), counted=True,
        )

    def _skip_batch(self, o: Outcome, settings: Settings, delay: float) -> Decision:
        """The same batch non-finite again: skip it for good; undo the lr cut it caused."""
        first_bad = o.first_bad_step if o.first_bad_step >= 0 else o.end_step
        before = self.nonfinite_batches[o.data_batch]  # the lr when it first failed
        undone = round(o.lr_scale / self.opts.lr_backoff, 12) if self.opts.lr_backoff > 0 \
            else before
        lr_scale = min(before, undone)
        batches = tuple(sorted({*settings.skip_batches, o.data_batch}))
        new = dataclasses.replace(settings, lr_scale=lr_scale, skip_batches=batches)
        return Decision(
            Verdict.RESTART, "skip_batch",
            f"{o.failure.value}: {o.detail}; the same batch ({o.data_batch}: {o.data_lines}) "
            "was non-finite before a rollback already: a data problem, not divergence; "
            f"that batch is skipped in every epoch from now on, lr_scale {o.lr_scale:g} -> "
            f"{lr_scale:g} (the earlier cut undone), resuming before step {first_bad}",
            delay, new, rollback_before=first_bad, counted=True,
        )

    def _shrink(self, o: Outcome, settings: Settings, delay: float) -> Decision:
        new = shrink_batch(settings)
        if new is None:
            return Decision(
                Verdict.GIVE_UP, "give_up",
                f"out of memory at micro-batch 1 with gradient checkpointing: {o.detail}",
                counted=True,
            )
        if new.grad_checkpoint and not settings.grad_checkpoint:
            what = "gradient checkpointing on (micro-batch is already 1)"
        else:
            what = (
                f"micro-batch {settings.batch_size} -> {new.batch_size}, grad accumulation "
                f"{settings.grad_accumulation_steps} -> {new.grad_accumulation_steps}"
            )
        return Decision(
            Verdict.RESTART, "reduce_memory", f"oom: {o.detail}; {what}", delay, new,
            counted=True,
        )


def offending_positions(o: Outcome) -> tuple[int, ...]:
    """The data positions a rollback skips once (see the module docstring): the failing
    batch of a non-finite step; the window of a gradient spike; () when the worker named
    none."""
    if o.data_position < 0:
        return ()
    if o.failure is FailureClass.GRAD_SPIKE and 0 <= o.first_bad_position <= o.data_position:
        return tuple(range(o.first_bad_position, o.data_position + 1))
    return (o.data_position,)


def shrink_batch(s: Settings) -> Settings | None:
    """Half the micro-batch (largest divisor <= half) with the same effective batch; at 1,
    gradient checkpointing; None when nothing is left to shrink."""
    if s.batch_size > 1:
        smaller = max(d for d in range(1, s.batch_size // 2 + 1) if s.batch_size % d == 0)
        factor = s.batch_size // smaller
        return dataclasses.replace(
            s, batch_size=smaller, grad_accumulation_steps=s.grad_accumulation_steps * factor
        )
    if not s.grad_checkpoint:
        return dataclasses.replace(s, grad_checkpoint=True)
    return None
