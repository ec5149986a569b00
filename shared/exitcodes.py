"""Worker exit codes and the failure classes the supervisor derives from them.

Both sides import this table; nobody compares against a bare number.

| code | ExitCode        | meaning                                                        |
|------|-----------------|----------------------------------------------------------------|
| 0    | COMPLETED       | all steps done (or the run was already complete)                |
| 1    | CRASH           | an uncaught exception (Python's own code for it)               |
| 20   | EARLY_STOPPED   | early stopping fired; a checkpoint was saved first             |
| 21   | GRAD_SPIKE      | gradient norm spiked; a checkpoint was saved first             |
| 22   | NON_FINITE      | loss or gradient went NaN/Inf; nothing was saved               |
| 23   | GRACEFUL_STOP   | SIGTERM: the current step finished and a checkpoint was saved  |
| 24   | DISK_FULL       | a write failed for want of space (ENOSPC, EDQUOT, MLX's        |
|      |                 | "[write] Unable to write"); the half-written checkpoint removed |
| 25   | CHECKPOINT_     | the checkpoint it was told to resume from is unusable (fails   |
|      | REFUSED         | validation, its tensors do not fit the model); names it        |
| 71   | SYSTEM_LIMIT    | the machine's limits cannot run mlx_lm, e.g. a hard open-file  |
|      |                 | limit below 4096 (EX_OSERR from sysexits.h)                    |
| 78   | BAD_CONFIG      | config or data is unusable (EX_CONFIG from sysexits.h)         |

A full disk is not the worker's fault and not a reason to give up: the supervisor waits for
space (it polls the free space, the wait is not counted against any budget) and resumes
when there is room for a checkpoint again (supervisor/daemon/policy.py, diskspace.py).
"""

from __future__ import annotations

from enum import Enum, IntEnum


class ExitCode(IntEnum):
    COMPLETED = 0
    CRASH = 1
    EARLY_STOPPED = 20
    GRAD_SPIKE = 21
    NON_FINITE = 22
    GRACEFUL_STOP = 23
    DISK_FULL = 24
    CHECKPOINT_REFUSED = 25
    SYSTEM_LIMIT = 71
    BAD_CONFIG = 78

    @classmethod
    def from_returncode(cls, code: int) -> ExitCode | None:
        """The ExitCode for a process return code, or None for unknown codes and signals."""
        try:
            return cls(code)
        except ValueError:
            return None


class FailureClass(str, Enum):
    """How one worker attempt ended, as the supervisor classifies it."""

    COMPLETED = "completed"
    EARLY_STOPPED = "early_stopped"
    GRAD_SPIKE = "grad_spike"
    NON_FINITE = "non_finite"
    BAD_CONFIG = "bad_config"
    GRACEFUL_STOP = "graceful_stop"
    CRASH = "crash"
    OOM = "oom"
    GPU_WATCHDOG = "gpu_watchdog"
    HANG = "hang"
    STALL = "stall"
    PLANNED_RESTART = "planned_restart"
    DISK_FULL = "disk_full"  # no space left where the run writes: wait for space, resume
    CHECKPOINT_REFUSED = "checkpoint_refused"  # quarantine it, resume from an older one
    SYSTEM_LIMIT = "system_limit"  # e.g. the hard open-file limit: give up, say which
    # Metal's buffer-count limit ("[metal::malloc] Resource limit (499000) exceeded"): a count
    # of live buffers, not memory; restart unchanged, recycle the worker when it recurs
    METAL_RESOURCE_LIMIT = "metal_resource_limit"
    MACHINE_RESTARTED = "machine_restarted"  # the machine rebooted (a panic, power) mid-attempt
    BATTERY_PAUSE = "battery_pause"  # on battery below supervisor.pause_below_charge: paused

    @property
    def is_failure(self) -> bool:
        """Whether this end counts as a failure (everywhere: logs, budgets, the report)."""
        return self not in NORMAL_ENDS

    @property
    def ends_run(self) -> bool:
        """Whether the run is done after it (nothing is left to train)."""
        return self in (FailureClass.COMPLETED, FailureClass.EARLY_STOPPED)


# The normal ends of an attempt: done, early-stopped, stopped on request (SIGTERM), stopped
# by the supervisor for a planned restart (memory, a worker recycle) or a pause on battery
# (checkpoint, wait for AC). Everything else is a failure.
NORMAL_ENDS = frozenset({FailureClass.COMPLETED, FailureClass.EARLY_STOPPED,
                         FailureClass.GRACEFUL_STOP, FailureClass.PLANNED_RESTART,
                         FailureClass.BATTERY_PAUSE})


EXIT_TO_CLASS: dict[ExitCode, FailureClass] = {
    ExitCode.COMPLETED: FailureClass.COMPLETED,
    ExitCode.CRASH: FailureClass.CRASH,
    ExitCode.EARLY_STOPPED: FailureClass.EARLY_STOPPED,
    ExitCode.GRAD_SPIKE: FailureClass.GRAD_SPIKE,
    ExitCode.NON_FINITE: FailureClass.NON_FINITE,
    ExitCode.GRACEFUL_STOP: FailureClass.GRACEFUL_STOP,
    ExitCode.DISK_FULL: FailureClass.DISK_FULL,
    ExitCode.CHECKPOINT_REFUSED: FailureClass.CHECKPOINT_REFUSED,
    ExitCode.SYSTEM_LIMIT: FailureClass.SYSTEM_LIMIT,
    ExitCode.BAD_CONFIG: FailureClass.BAD_CONFIG,
}
