"""Where a worker attempt starts from: the checkpoint, and whether the run may continue it.

`choose_checkpoint`: the one --resume names (validated here unless the supervisor validated
it: `--validated SHA256`), or the newest valid one (`--resume auto`), or none (`--fresh`).
`reconcile`: a resumed run trains the same thing (config hash); only the batch split may
change, keeping the effective batch. `check_data`: the training file is the one the data
position counts in.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import structlog

from shared import checkpoint as ckpt
from shared.config import Config
from shared.errors import CheckpointError, ConfigError, DataError
from shared.fsutil import fsync_dir
from shared.layout import CHECKPOINT_PREFIX, RunDir
from shared.trainer_state import TrainerState

log = structlog.get_logger("worker")


def choose_checkpoint(args: argparse.Namespace, run: RunDir
                      ) -> tuple[Path | None, TrainerState | None]:
    """The checkpoint to resume from and its (validated) trainer state.

    A checkpoint the supervisor validated comes with `--validated SHA256` (its manifest's
    hash): then only that the manifest is unchanged, the sizes and the trainer state are
    checked here, not every byte again.
    """
    resume = args.resume
    if args.fresh:
        return None, None
    if resume != "auto":
        from worker.model import is_mlx_lm_adapter  # no MLX import

        path = Path(resume).expanduser().resolve()
        not_one = _not_a_checkpoint(path)
        if not_one:
            raise CheckpointError(f"--resume {resume}: {not_one}")
        if is_mlx_lm_adapter(path):
            raise CheckpointError(
                f"--resume {resume}: an mlx_lm adapter, not a checkpoint: use "
                f"resume_adapter_file: {path} in the config (or --resume-adapter-file) to "
                "start a fresh run from its weights"
            )
        trusted = getattr(args, "validated", None)
        result = ckpt.validate(path, trusted_manifest=trusted)
        if not result.ok or result.state is None:
            raise CheckpointError(f"--resume {resume}: {result.reason}")
        log.info("checkpoint_validated", path=str(path), step=result.state.step,
                 by_supervisor=trusted == result.manifest_sha256)
        return path, result.state

    def skipped(info: ckpt.CheckpointInfo, reason: str) -> None:
        log.warning("checkpoint_invalid_skipped", path=str(info.path), reason=reason)

    found = ckpt.newest_valid(run.checkpoints, on_invalid=skipped)
    if found is None:
        log.info("starting_fresh", reason="no valid checkpoint")
        return None, None
    return found[0].path, found[1].state

def reconcile(c: Config, stored: TrainerState, path: Path) -> Config:
    """The config of a resumed run must train the same thing; the batch split may change."""
    if stored.config_hash != c.hash():
        old = stored.config
        new = c.to_dict()
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ConfigError(
            f"{path.name} was written with a different config (changed: {keys}); "
            "use --fresh to start over, or restore the original config"
        )
    effective = stored.batch.effective
    if c.effective_batch != effective:
        if effective % c.batch_size:
            raise ConfigError(
                f"batch_size: {c.batch_size} does not divide the run's effective batch "
                f"{effective} (batch_size x grad_accumulation_steps must stay {effective})"
            )
        accum = effective // c.batch_size
        log.info(
            "effective_batch_kept",
            effective=effective,
            batch_size=c.batch_size,
            grad_accumulation_steps=accum,
        )
        c = dataclasses.replace(c, grad_accumulation_steps=accum)
    return c

def check_data(stored: TrainerState, train_set: Any) -> None:
    """The data position counts in the file the checkpoint was trained on."""
    before = stored.data.train_fingerprint if stored.data is not None else None
    if before and before != train_set.index.fingerprint:
        raise DataError(
            f"{train_set.index.path} changed since the checkpoint was written "
            "(fingerprint differs): the data position would be meaningless; "
            "restore the file or use --fresh"
        )


def _not_a_checkpoint(path: Path) -> str:
    """Why `--resume PATH` names no checkpoint, when it is something else we know ("" when
    it may be one: the validator then judges it)."""
    if not path.exists():
        return f"{path}: no such checkpoint directory"
    if path.is_file() and (path.parent / "manifest.json").is_file():
        return f"{path} is a file of the checkpoint {path.parent}: --resume {path.parent}"
    ckpt_dir = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    steps = sorted(ckpt_dir.glob(f"{CHECKPOINT_PREFIX}*")) if path.is_dir() else []
    if (path / "checkpoints").is_dir() and (path / "run_id").is_file():
        hint = f", or name one: --resume {steps[-1]}" if steps else ""
        return (f"{path} is a run directory, not a checkpoint: `--run-dir {path}` resumes "
                f"from its newest valid checkpoint{hint}")
    if steps and not (path / "manifest.json").exists():
        return (f"{path} is a checkpoints directory, not a checkpoint: name one: --resume "
                f"{steps[-1]}")
    return ""


def move_previous_aside(run: RunDir) -> None:
    """`--fresh`: the run's checkpoints, adapters, COMPLETE and injection marks move to
    RUN_DIR/previous/<time>/ (never deleted)."""
    if (
        not (run.checkpoints.exists() and any(run.checkpoints.iterdir()))
        and not run.is_complete
    ):
        return
    dest = run.root / "previous" / time.strftime("%Y%m%dT%H%M%S")
    dest.mkdir(parents=True)
    for item in (run.checkpoints, run.adapters, run.complete_marker, run.root / "inject"):
        if item.exists():
            os.replace(item, dest / item.name)
    run.checkpoints.mkdir()
    fsync_dir(run.root)
    log.info("previous_run_moved_aside", to=str(dest))
