"""One running worker attempt: its process and everything the supervisor learns about it.

`Attempt` holds the process (supervisor/daemon/spawn.py), the picture built from its
telemetry (`AttemptView`, supervisor/daemon/watch.py), its memory samples (`MemoryWatch`),
why and how it is being stopped (`StopEscalation`, supervisor/daemon/stopping.py), and what
noticed a problem with it. It decides nothing: the loop (supervisor/daemon/loop.py) says
when to stop it, supervisor/daemon/ending.py reads it once it has ended.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

from shared.config import SupervisorOptions
from shared.run_record import Detection
from supervisor.daemon.group_watch import GroupView
from supervisor.daemon.memory import MemoryWatch, Sample
from supervisor.daemon.spawn import WorkerProcess
from supervisor.daemon.state import StopReason
from supervisor.daemon.stopping import StopEscalation
from supervisor.daemon.watch import AttemptView

# What noticed each kind of trouble the loop detects (watch.check, memory).
DETECTED_BY = {"hang": Detection.HEARTBEAT_TIMEOUT, "stall": Detection.STALL_TIMEOUT,
               "memory": Detection.MEMORY, "recycle": Detection.RECYCLE,
               "power": Detection.POWER}


@dataclass(frozen=True)
class Noticed:
    """Why the supervisor decided the attempt had to end (before it ended)."""

    by: Detection
    detail: str
    seconds: float  # how long the worker had been silent or stuck when noticed


class Attempt:
    """The attempt numbered `number`, started at `started_at` (monotonic seconds) from
    `start_step` with `lr_scale` in effect; output (stdout and stderr) goes to `output`;
    `token`: its telemetry token (supervisor/daemon/telemetry_gate.py)."""

    def __init__(self, number: int, proc: WorkerProcess, output: Path, started_at: float,
                 start_step: int, lr_scale: float, opts: SupervisorOptions,
                 token: str = "") -> None:
        self.number = number
        self.proc = proc
        self.resumed_from: Path | None = None  # the checkpoint it was told to resume from
        self.token = token
        self.output = output
        self.lr_scale = lr_scale
        self.view = AttemptView(number, proc.pid, started_at, start_step)
        pids: tuple[int, ...] = getattr(proc, "pids", ())  # a group (supervisor/daemon/group.py)
        self.rank_pids = pids
        self.group = GroupView(len(pids), started_at, start_step) if pids else None
        self.mem = MemoryWatch(opts, start_step=start_step)
        self.stopping = StopEscalation(opts.stop_timeout)
        self.stop_reason: StopReason | None = None  # the first reason we asked it to stop
        self.user_stop = False  # a person (or a signal to the supervisor) asked to stop
        self.stop_note = ""  # and why, when the control request said (`overnight stop --reason`)
        self.noticed: Noticed | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        """The return code once it has ended (Popen convention: -N = killed by signal N)."""
        return self.proc.poll()

    def notice(self, kind: str, detail: str, seconds: float, rank: int | None = None) -> None:
        """A problem was detected ("hang", "stall", "memory"); kept for the record. `rank`:
        a group's culprit, signalled first when the group is stopped."""
        self.noticed = Noticed(DETECTED_BY[kind], detail, seconds)
        name = getattr(self.proc, "name_culprit", None)
        if rank is not None and name is not None:
            name(rank)

    @property
    def group_ending(self) -> bool:
        """A group one of whose ranks has ended: the group is ending (its poll() stops the
        others), so its silence is not a hang of its own."""
        return bool(getattr(self.proc, "ending", False))

    def add_sample(self, s: Sample) -> str | None:
        """Fold in a memory sample; a reason when a planned restart is due."""
        return self.mem.add(s)

    def terminate(self, reason: StopReason, now: float) -> bool:
        """Ask it to stop: SIGTERM + SIGCONT (it saves a checkpoint and exits). A second
        request keeps the first reason and deadline; returns whether signals were sent."""
        if reason is StopReason.USER:
            self.user_stop = True
            if self.noticed is None:
                self.noticed = Noticed(Detection.STOP_REQUEST, "stop requested", 0.0)
        if self.stop_reason is not None:
            return False
        self.stop_reason = reason
        return self.stopping.begin(self.proc, now)

    def request_checkpoint(self) -> None:
        """SIGUSR1: the worker saves a checkpoint at the end of its step and goes on."""
        self.proc.signal(signal.SIGUSR1)
