"""The command line of the next worker attempt: `<command> train CONFIG ...`.

    <python> -m worker train CONFIG --run-dir RUN --telemetry ipc://... --attempt N
        --run-id ID (--resume CHECKPOINT --validated SHA256 | --resume auto)
        [--set batch_size=2 ...] [--lr-scale 0.5] [--skip-batch B ...]
        [--skip-position P ...] [--skip-steps K]

A worker started before its checkpoint is chosen gets `--resume-fd FD` instead of `--resume`,
`--skip-steps` and `--skip-position`, and those facts later over the pipe FD
(shared/resume_handoff.py, supervisor/daemon/early_start.py).

`--validated`: the sha256 of the manifest the supervisor validated (the worker re-checks only
that); `--resume auto` when no checkpoint is valid (every one was quarantined, so the worker
starts from scratch; not --fresh, which would move the run's history aside). `--set` carries
the settings the policy changed (supervisor/daemon/policy.py), `--lr-scale` a rollback's,
`--skip-position` the offending data positions of rollbacks still ahead of the checkpoint
(each passed over once), `--skip-steps` how many positions to skip after the resume point
when the worker named none, `--skip-batch` the epoch-plan batches found to be data problems.

The attempt's telemetry token goes in the environment (`worker_env`, shared.protocol.TOKEN_ENV),
never on the command line: argv is in the log, in run.json and in `ps` for every local user.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from shared.checkpoint import CheckpointInfo, Validation
from shared.layout import RunDir
from shared.protocol import TOKEN_ENV
from supervisor.daemon.policy import Settings


def worker_env(base: dict[str, str], token: str) -> dict[str, str]:
    """The environment of one attempt: `base` plus its telemetry token (TOKEN_ENV)."""
    return {**base, TOKEN_ENV: token}


def worker_argv(
    command: list[str], config_path: Path, run: RunDir, attempt: int, run_id: str,
    resume: tuple[CheckpointInfo, Validation] | None, settings: Settings,
    base_settings: Settings, skip_steps: int, skip_positions: Sequence[int] = (),
    handoff: bool = False,
) -> list[str]:
    """The argv; `handoff`: no `--resume` (nor skips): the resume point is told later over
    a pipe (`--resume-fd`, added by supervisor/daemon/early_start.py)."""
    argv = [*command, "train", str(config_path), "--run-dir", str(run.root),
            "--telemetry", run.telemetry_endpoint, "--attempt", str(attempt),
            "--run-id", run_id]
    if handoff:
        pass
    elif resume is not None:
        info, validation = resume
        argv += ["--resume", str(info.path), "--validated", validation.manifest_sha256]
    else:
        argv += ["--resume", "auto"]
    for key, value in settings.to_dict().items():
        if key not in ("lr_scale", "skip_batches", "skip_positions") \
                and value != getattr(base_settings, key):
            text = str(value).lower() if isinstance(value, bool) else str(value)
            argv += ["--set", f"{key}={text}"]
    if settings.lr_scale is not None:
        argv += ["--lr-scale", repr(settings.lr_scale)]
    for batch in settings.skip_batches:
        argv += ["--skip-batch", str(batch)]
    for position in skip_positions:
        argv += ["--skip-position", str(position)]
    if skip_steps:
        argv += ["--skip-steps", str(skip_steps)]
    return argv
