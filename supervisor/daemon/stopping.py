"""How a process is stopped: the one definition, for the worker, an orphan and the supervisor.

SIGTERM to the process (the worker finishes its step, saves a checkpoint, exits 23) and
SIGCONT to its group (a stopped process, e.g. one hung with SIGSTOP, can only act on SIGTERM
once it runs), then wait `grace` seconds (supervisor.stop_timeout), then SIGKILL to the whole
group. SIGKILL is the last resort: a SIGKILLed MLX process can strand wired GPU memory, and
its checkpoint is cut in half.

The supervisor's loop must never block, so it drives a `StopEscalation` step by step (`begin`,
then `overdue` on each tick, then `kill`). Code that may block — the start-up stopping an
orphaned worker, a failing supervisor stopping its worker, the demo stopping its supervisor —
calls `stop()`, which runs the same escalation to the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import psutil

POLL_INTERVAL = 0.1


class Stoppable(Protocol):
    """A process as the escalation needs it (supervisor/daemon/spawn.py's WorkerProcess)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def signal(self, sig: int) -> None: ...

    def signal_group(self, sig: int) -> None: ...


class HowStopped(str, Enum):
    GONE = "gone"  # it had already ended
    TERMINATED = "terminated"  # it ended within the grace period
    KILLED = "killed"  # SIGKILL after the grace period


@dataclass
class StopEscalation:
    """One stop of one process, driven by a clock the caller owns."""

    grace: float
    started: float | None = None
    killed: bool = False

    def begin(self, proc: Stoppable, now: float) -> bool:
        """SIGTERM + SIGCONT now; False (nothing sent) if this stop has already begun."""
        if self.started is not None:
            return False
        self.started = now
        proc.signal(signal.SIGTERM)
        proc.signal_group(signal.SIGCONT)
        return True

    @property
    def deadline(self) -> float | None:
        """When SIGKILL is due (None before `begin`, and after `kill`)."""
        if self.started is None or self.killed:
            return None
        return self.started + self.grace

    def overdue(self, now: float) -> float | None:
        """Seconds waited, once the grace period is over and SIGKILL is due; else None."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return None
        return now - (self.started if self.started is not None else now)

    def kill(self, proc: Stoppable) -> None:
        self.killed = True
        proc.signal_group(signal.SIGKILL)


def stop(proc: Stoppable, grace: float, clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep) -> HowStopped:
    """Run the escalation to its end, blocking: SIGTERM + SIGCONT, wait, SIGKILL."""
    if proc.poll() is not None:
        return HowStopped.GONE
    escalation = StopEscalation(grace)
    escalation.begin(proc, clock())
    while proc.poll() is None:
        if escalation.overdue(clock()) is not None:
            escalation.kill(proc)
            for _ in range(int(5 / POLL_INTERVAL)):  # the kernel reaps it at once
                if proc.poll() is not None:
                    break
                sleep(POLL_INTERVAL)
            return HowStopped.KILLED
        sleep(POLL_INTERVAL)
    return HowStopped.TERMINATED


class ProcessHandle:
    """A process we did not start (an orphaned worker) as a Stoppable, through psutil."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.pid = proc.pid

    def poll(self) -> int | None:
        """Its exit code when it is our child, 0 when it is gone otherwise, None if it runs."""
        try:
            if self.proc.status() != psutil.STATUS_ZOMBIE:
                code = self.proc.wait(timeout=0)  # reaps it if it is our child
                return 0 if code is None else code
            with contextlib.suppress(psutil.Error):
                return self.proc.wait(timeout=0) or 0
            return 0
        except psutil.TimeoutExpired:
            return None
        except psutil.NoSuchProcess:
            return 0

    def signal(self, sig: int) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            self.proc.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """The group when the process leads one (workers run in their own session), else the
        process alone."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(self.pid) == self.pid:
                os.killpg(self.pid, sig)
                return
        self.signal(sig)


class PopenHandle:
    """A child started with subprocess.Popen as a Stoppable (its group: only when it leads one)."""

    def __init__(self, popen: subprocess.Popen[bytes] | subprocess.Popen[str]) -> None:
        self.popen = popen
        self.pid = popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(self.pid) == self.pid:
                    os.killpg(self.pid, sig)
                    return
            self.signal(sig)
