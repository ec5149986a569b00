"""Watching a data-parallel group: every rank's heartbeat, and the group's step. Pure: times
are passed in.

A rank that dies ends the group at once (supervisor/daemon/group.py). A rank that is alive
but silent — stopped (SIGSTOP), or cut off (a pulled cable: measured with two network
namespaces and `ip link set down`) — leaves the others blocked in a collective forever,
busy-polling, while their heartbeat threads keep beating. So besides rank 0's own checks
(supervisor/daemon/watch.py: its heartbeat, its step and phase):

- **hang**: a rank sent no message for `heartbeat_timeout` (`startup_timeout` until it
  reports the training phase); the culprit is that rank;
- **stall**: the group's step — the minimum over the ranks' reported steps — did not move
  for `stall_timeout` while heartbeats flow. The clock follows rank 0's phase: its
  checkpoints and evaluations make the others wait, and each of its phase changes counts as
  progress (watch.py). The culprit is the rank whose step lags the others, or the rank
  whose messages are the oldest when all stand at the same step; none when they are alike
  (a link pulled between two ranks: each waits for the other).

`check()` gives (kind, seconds, detail, culprit rank or None) for one process and for a
group alike, so the loop (supervisor/daemon/loop.py) needs one call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.config import SupervisorOptions
from shared.protocol import Heartbeat, Message, Phase, StepMetrics, WorkerStopping
from supervisor.daemon import watch
from supervisor.daemon.watch import STARTUP_PHASES, AttemptView


@dataclass
class RankView:
    """What one rank's messages said last."""

    rank: int
    last_seen: float  # monotonic
    step: int
    phase: Phase = Phase.STARTING
    heartbeats: int = 0
    done: bool = False  # it said it is stopping (WorkerStopping): its silence is no hang


@dataclass
class GroupView:
    """The ranks of one attempt as telemetry shows them; `progress_at`: when the group's
    step (the minimum) last moved."""

    size: int
    spawned_at: float
    start_step: int
    ranks: list[RankView] = field(default_factory=list)
    progress_at: float = 0.0

    def __post_init__(self) -> None:
        self.ranks = [RankView(r, self.spawned_at, self.start_step) for r in range(self.size)]
        self.progress_at = self.spawned_at

    @property
    def step(self) -> int:
        """The group's step: the lowest step any rank reported."""
        return min(r.step for r in self.ranks)

    def update(self, msg: Message, now: float) -> None:
        """Fold in one believed message of rank `msg.rank` (ignored when out of range)."""
        rank = getattr(msg, "rank", 0)
        if not 0 <= rank < self.size:
            return
        view, before = self.ranks[rank], self.step
        view.last_seen = now
        if isinstance(msg, Heartbeat):
            view.heartbeats += 1
            view.phase = msg.phase
            view.step = max(view.step, msg.step)
        elif isinstance(msg, StepMetrics):
            view.step = max(view.step, msg.step)
        elif isinstance(msg, WorkerStopping):
            view.done = True
        if self.step > before:
            self.progress_at = now

    def silent(self, opts: SupervisorOptions, now: float) -> tuple[int, float] | None:
        """(rank, seconds) of the rank silent past its heartbeat timeout, the longest first."""
        late = []
        for r in (r for r in self.ranks if not r.done):
            timeout = (opts.startup_timeout if r.phase in STARTUP_PHASES
                       else opts.heartbeat_timeout)
            if now - r.last_seen >= timeout:
                late.append((now - r.last_seen, r.rank))
        if not late:
            return None
        seconds, rank = max(late)
        return rank, seconds

    def laggard(self) -> int | None:
        """The rank holding the group back: the lowest step, or the stalest messages when
        all stand at the same step; None when no rank stands out."""
        low = self.step
        behind = [r.rank for r in self.ranks if r.step == low]
        if len(behind) < self.size:
            return behind[0] if len(behind) == 1 else None
        return None


def check(view: AttemptView, group: GroupView | None, opts: SupervisorOptions, now: float
          ) -> tuple[str, float, str, int | None] | None:
    """("hang" | "stall", seconds, detail, culprit rank or None), or None when healthy."""
    if group is not None:
        found = group.silent(opts, now)
        if found is not None:
            rank, seconds = found
            return ("hang", seconds, f"rank {rank}: no heartbeat for {seconds:.1f} s "
                    f"(ranks at steps {[r.step for r in group.ranks]})", rank)
    single = watch.check(view, opts, now)
    if single is not None and single[0] == "hang":
        seconds = single[1]
        prefix = "rank 0: " if group is not None else ""
        return "hang", seconds, f"{prefix}no heartbeat for {seconds:.1f} s", (
            0 if group is not None else None)
    if group is None:
        if single is None:
            return None
        return ("stall", single[1],
                f"no step for {single[1]:.1f} s while heartbeats continue", None)
    stall_at = watch.stall_deadline(view, opts)
    if stall_at is None:
        return None
    # Rank 0's step and phase changes count (its checkpoint and evaluation make the others
    # wait); in a group no rank gets more than one step ahead of another (collectives).
    since = max(group.progress_at, view.progress_at)
    if now < since + opts.stall_timeout:
        return None
    seconds = now - since
    culprit = group.laggard()
    who = f"rank {culprit} lags" if culprit is not None else "no rank stands out"
    return ("stall", seconds, f"the group made no step for {seconds:.1f} s while heartbeats "
            f"continue ({who}; ranks at steps {[r.step for r in group.ranks]})", culprit)
