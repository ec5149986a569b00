"""The next attempt's worker, started while its checkpoint is still being validated.

A restart used to run validation, then spawn: the worker's imports and model load (seconds)
waited for the sha256 of every checkpoint file (milliseconds for adapters, seconds for a
full fine-tune). Now the loop (supervisor/daemon/loop.py) starts the worker first, with
`--resume-fd FD` instead of `--resume ...`, and validates in its thread meanwhile; the
runner (supervisor/daemon/runner.py) *adopts* the early worker once the choice is made —
quarantines what is invalid, then tells the worker where to resume from over the pipe
(shared/resume_handoff.py) — and only from then on is it the running attempt: in run.json,
in `overnight status`, watched for hangs, its telemetry believed.

Until adopted, the worker is a process the supervisor owns and nothing more: it has its
orphan guard (supervisor/daemon/spawn.py), its telemetry is expected and ignored (not
counted as forged: telemetry_gate.py), and if it dies meanwhile its exit is seen right after
adoption, like any attempt's. When the start is no longer wanted (a stop while validating,
the supervisor leaving), `abandon()` closes the pipe (the worker reads end-of-file and exits
GRACEFUL_STOP having trained and written nothing) and stops it as any worker is stopped
(stopping.py). A supervisor killed outright closes the pipe by dying; the orphan guard does
the rest.

Only one-process runs start early, through the real spawner (PopenSpawner, which can pass a
descriptor): a data-parallel group's ranks, and test spawners, still validate first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from shared import resume_handoff
from shared.checkpoint import CheckpointInfo, Validation
from supervisor.daemon.spawn import PopenSpawner, WorkerProcess
from supervisor.daemon.stopping import HowStopped, stop


@dataclass
class EarlyWorker:
    """A started worker waiting for its checkpoint choice; `fd` is the pipe's write end,
    which only this process holds (-1 once the choice is sent or the start abandoned)."""

    attempt: int
    proc: WorkerProcess
    argv: list[str]
    token: str
    output: Path
    fd: int

    def tell(self, found: tuple[CheckpointInfo, Validation] | None, skip_steps: int,
             skip_positions: tuple[int, ...]) -> resume_handoff.Handoff:
        """Send the choice (None: no valid checkpoint, start from scratch) and close the
        pipe. A worker that already exited does not read it; its exit says why."""
        if found is None:
            handoff = resume_handoff.Handoff("auto", None, skip_steps, skip_positions)
        else:
            info, validation = found
            handoff = resume_handoff.Handoff(str(info.path), validation.manifest_sha256,
                                             skip_steps, skip_positions)
        fd, self.fd = self.fd, -1
        resume_handoff.send(fd, handoff)
        return handoff

    def abandon(self, stop_timeout: float) -> HowStopped:
        """This start is not wanted: close the pipe, stop the worker (blocking, at most
        `stop_timeout` + a SIGKILL)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            resume_handoff.send(fd, None)
        return stop(self.proc, stop_timeout)


def start_early(spawner: PopenSpawner, argv: list[str], env: dict[str, str], output: Path,
                attempt: int, token: str) -> EarlyWorker:
    """Spawn `argv` + `--resume-fd R` with the pipe's read end R passed down; OSError when
    the process cannot be started (nothing is left open then)."""
    read_end, write_end = os.pipe()
    try:
        full = [*argv, resume_handoff.FLAG, str(read_end)]
        proc = spawner.spawn(full, env, output, extra_fds=(read_end,))
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)  # the worker has its copy; ours would hide the supervisor's death
    return EarlyWorker(attempt, proc, full, token, output, write_end)
