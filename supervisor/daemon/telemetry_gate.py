"""Which telemetry messages the supervisor believes: those of the running attempt, carrying
its token, whose steps only move forward and stay within the run.

Anything that can connect to the telemetry socket can publish on it, and a well-formed
metrics message claiming step 10**9 used to end up as the run's final_step and
high_water_step. So each attempt gets a random token (`new_token()`, 128 bits), handed to
its worker in the environment (shared.protocol.TOKEN_ENV: not on the command line, which
every local user can read) and stamped by the worker on every message
(worker/telemetry.py). A message is believed only if

- it carries the running attempt's token (compared in constant time), its attempt number
  and, for a heartbeat, the worker's pid — in a data-parallel group, the pid of the rank it
  names (`rank`; a rank on another machine: any pid, its messages are authenticated by
  CURVE instead, supervisor/daemon/curve.py), and a rank within the group;
- its step is within 0..total_steps, the run's `iters` as the attempt's worker reads it
  (the loop reads the config file when the attempt starts: `iters` is not in the config
  hash, so a user may raise it between attempts); a heartbeat's own total_steps is not
  above it either;
- its step does not go back: per kind of message (heartbeat, metrics, eval, checkpoint,
  stopping; each kind travels in order, heartbeats come from another thread than the rest)
  the step is non-decreasing within the attempt; an eval's best_step is not beyond its
  step, a stopping message's first_bad_step not beyond its step + 1 (the failing step is
  the one the worker was computing).

A message of a worker started before its attempt began (early_start.py: its checkpoint is
being validated) is early: ignored and counted apart, not rejected (`expect`).
A message with the token of an attempt that has ended is late (its worker's last words,
arriving after the exit was handled): ignored and counted apart, not rejected. Everything
else is rejected: counted, with the first reason kept, and ignored. The loop logs
rejections (`telemetry_rejected`, rate-limited) and reports the count in `overnight status`.
"""

from __future__ import annotations

import hmac
import itertools
import secrets
from dataclasses import dataclass, field

from shared.protocol import (
    CheckpointSaved,
    EvalResult,
    Heartbeat,
    Message,
    StepMetrics,
    WorkerStopping,
)
from shared.step_columns import StepColumns

TELEMETRY_TYPES = (Heartbeat, StepMetrics, EvalResult, CheckpointSaved, WorkerStopping)


def new_token() -> str:
    """A fresh attempt token: 32 hex digits (128 random bits)."""
    return secrets.token_hex(16)


@dataclass
class AttemptTelemetry:
    """What one attempt's messages must match; `last` = the last believed step per kind."""

    attempt: int
    pid: int
    token: str
    total_steps: int  # the run's iters when the attempt started
    last: dict[tuple[type, int], int] = field(default_factory=dict)  # per kind and rank
    rank_pids: tuple[int, ...] = ()  # a group's pid per rank (0: remote); () = one process

    def check(self, msg: Message) -> str | None:
        """None when `msg` (of this attempt's token) is believable, else why not."""
        kind = type(msg).__name__
        attempt = getattr(msg, "attempt", None)
        if attempt != self.attempt:
            return f"{kind}: attempt {attempt} with the token of attempt {self.attempt}"
        rank = getattr(msg, "rank", 0)
        if not 0 <= rank < max(1, len(self.rank_pids)):
            return f"{kind}: rank {rank}, the group has {max(1, len(self.rank_pids))}"
        if isinstance(msg, Heartbeat):
            pid = self.rank_pids[rank] if self.rank_pids else self.pid
            if pid and msg.pid != pid:
                who = f"rank {rank}" if self.rank_pids else "the worker"
                return f"heartbeat: pid {msg.pid}, {who} is pid {pid}"
            if not 1 <= msg.total_steps <= self.total_steps:
                return (f"heartbeat: total_steps {msg.total_steps} outside "
                        f"1..{self.total_steps} (the run's iters)")
        step = msg.step  # type: ignore[union-attr]
        total = msg.total_steps if isinstance(msg, Heartbeat) else self.total_steps
        why = _step_reason(kind, step, total, self.last.get((type(msg), rank)))
        if why is not None:
            return why
        if isinstance(msg, EvalResult) and msg.best_step > step:
            return f"eval: best_step {msg.best_step} after its step {step}"
        # The failing step is the one being computed: one past the last finished step.
        if isinstance(msg, WorkerStopping) and msg.first_bad_step > step + 1:
            return (f"stopping: first_bad_step {msg.first_bad_step} beyond the step after its "
                    f"step {step}")
        return None

    def believe(self, msg: Message) -> None:
        self.last[(type(msg), msg.rank)] = msg.step  # type: ignore[union-attr]


class TelemetryGate:
    """The checks above across the run's attempts, and the counts."""

    def __init__(self) -> None:
        self.current: AttemptTelemetry | None = None
        self.ended: set[str] = set()  # tokens of attempts that have ended
        self.expected: set[str] = set()  # tokens of workers started early, not yet attempts
        self.early = 0
        self.accepted = 0
        self.late = 0
        self.rejected = 0
        self.first_reason = ""
        self.last_reason = ""

    def begin(self, attempt: int, pid: int, token: str, total_steps: int,
              rank_pids: tuple[int, ...] = ()) -> None:
        """An attempt started with `token`; its worker is `pid` (a group: `rank_pids`)."""
        self.end()
        self.expected.discard(token)
        self.current = AttemptTelemetry(attempt, pid, token, total_steps, rank_pids=rank_pids)

    def expect(self, token: str) -> None:
        """A worker was started with `token` before its attempt began (its checkpoint is
        being validated: supervisor/daemon/early_start.py): its messages until `begin` are
        early — ignored and counted apart, not rejected."""
        self.expected.add(token)

    def end(self) -> None:
        """The running attempt ended: its stragglers are late, not rejected."""
        if self.current is not None:
            self.ended.add(self.current.token)
        self.current = None

    def admit(self, msg: Message) -> bool:
        """Whether to believe `msg`; counts what is not believed."""
        if not isinstance(msg, TELEMETRY_TYPES):
            return self.reject(f"{type(msg).__name__}: not a telemetry message")
        token = msg.token
        current = self.current
        if current is not None and _same(token, current.token):
            reason = current.check(msg)
            if reason is not None:
                return self.reject(reason)
            current.believe(msg)
            self.accepted += 1
            return True
        if token in self.ended:
            self.late += 1
            return False
        if token in self.expected:
            self.early += 1
            return False
        what = "no token" if not token else "a token of no attempt"
        running = f"attempt {current.attempt}" if current is not None else "no attempt"
        return self.reject(f"{type(msg).__name__} with {what} ({running} running)")

    def admit_steps(self, batch: StepColumns) -> list[int]:
        """The rows of a metrics batch to believe (their indices, in order): each row is
        judged exactly as `admit` judges the StepMetrics it stands for, and counted the same
        (per row: accepted, late or rejected) — with the envelope's checks (token, attempt,
        rank) made once and the per-row ones on the step column alone."""
        n = len(batch.step)
        current = self.current
        if current is None or not _same(batch.token, current.token):
            if batch.token in self.ended:
                self.late += n
                return []
            if batch.token in self.expected:  # as `admit`: a worker started early
                self.early += n
                return []
            what = "no token" if not batch.token else "a token of no attempt"
            running = f"attempt {current.attempt}" if current is not None else "no attempt"
            self.reject(f"StepMetrics with {what} ({running} running)", n)
            return []
        if batch.attempt != current.attempt:
            self.reject(f"StepMetrics: attempt {batch.attempt} with the token of attempt "
                        f"{current.attempt}", n)
            return []
        ranks = max(1, len(current.rank_pids))
        if not 0 <= batch.rank < ranks:
            self.reject(f"StepMetrics: rank {batch.rank}, the group has {ranks}", n)
            return []
        key, total = (StepMetrics, batch.rank), current.total_steps
        last = current.last.get(key)
        steps = batch.step
        if (last is None or steps[0] >= last) and steps[0] >= 0 and steps[-1] <= total \
                and all(a <= b for a, b in itertools.pairwise(steps)):
            believed = list(range(n))  # the common case: every step in order and in range
            last = steps[-1]
        else:
            believed = []
            for i, step in enumerate(steps):
                why = _step_reason("StepMetrics", step, total, last)
                if why is None:
                    believed.append(i)
                    last = step
                else:
                    self.reject(why)
        if believed:
            current.last[key] = last  # type: ignore[assignment]
            self.accepted += len(believed)
        return believed

    def reject(self, reason: str, count: int = 1) -> bool:
        """Count `count` messages not believed (also one that did not decode) for `reason`;
        returns False."""
        self.rejected += count
        self.first_reason = self.first_reason or reason
        self.last_reason = reason
        return False


def _step_reason(kind: str, step: int, total: int, last: int | None) -> str | None:
    """Why a message's step is not believable (outside 0..total, or behind the last
    believed step of its kind), or None."""
    if not 0 <= step <= total:
        return f"{kind}: step {step} outside 0..{total} (total steps)"
    if last is not None and step < last:
        return f"{kind}: step {step} after step {last} (steps only move forward)"
    return None


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"),
                               b.encode("utf-8", "surrogatepass"))

