"""Where a worker attempt starts from: the checkpoint, and whether the run may continue it.

`choose_checkpoint`: the one --resume names (validated here unless the supervisor validated
it: `--validated SHA256`), or the newest valid one (`--resume auto`), or none (`--fresh`).
`reconcile`: a resumed run trains the same thing (config hash); only the batch split may
change, keeping the effective batch. `check_data`: the training file is the one the data
position counts in.

Two kinds of "cannot resume", told apart because they need opposite remedies:
- the *checkpoint* is unusable (it fails validation here, its config_hash is not the hash of
  its own config, its tensors do not fit the model: worker/checkpointing.py) —
  `CheckpointRefused`, exit CHECKPOINT_REFUSED naming it; the supervisor quarantines it and
  resumes from the next older valid one. `--fresh` would be wrong: it would set aside the
  run's good checkpoints with the bad one.
- the *config* changed (a hashed key differs from the config the checkpoint stores) — a
  ConfigError naming each changed key, dotted, with both values (`lora_parameters.rank: 8
  -> 16`); every checkpoint of the run has the old config, so only restoring those keys or
  `--fresh` can go on.
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
from shared import config_identity
from shared.config import Config
from shared.errors import CheckpointError, CheckpointRefused, ConfigError, DataError
from shared.fsutil import fsync_dir
from shared.layout import CHECKPOINT_PREFIX, RunDir
from shared.safetensors_check import read_header
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
            raise CheckpointRefused(path, f"--resume {resume}: {result.reason}")
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
    """The config of a resumed run must train the same thing; the batch split may change.

    ConfigError naming the changed keys when the config changed; CheckpointRefused when the
    checkpoint disagrees with itself (module docstring)."""
    if stored.config_hash != c.hash():
        if not stored.config:  # an old checkpoint that does not store its config
            raise ConfigError(
                f"{path.name} was written with a different config (config hash "
                f"{stored.config_hash}, now {c.hash()}; the checkpoint does not store its "
                "config, so the keys cannot be named); restore the original config, or start "
                "over with --fresh (moves the run's checkpoints to RUN_DIR/previous/)")
        own = config_identity.config_hash(stored.config)
        if own != stored.config_hash:  # the validator refuses it too (trainer_state.py)
            raise CheckpointRefused(
                path, f"its config_hash {stored.config_hash} is not the hash of the config "
                f"stored with it ({own})")
        changed = config_identity.changes(stored.config, c.to_dict())
        if not changed:  # cannot be: equal hashed keys have equal hashes
            raise CheckpointRefused(path, f"config_hash {stored.config_hash} differs from "
                                          f"{c.hash()} with no hashed key changed")
        raise ConfigError(
            f"{path.name} was written with a different config: "
            f"{config_identity.describe(changed)}; restore "
            f"{'that key' if len(changed) == 1 else 'those keys'} to resume this run, or "
            "start over with --fresh (moves the run's checkpoints to RUN_DIR/previous/)"
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

def not_fitting(path: Path, problem: str) -> CheckpointRefused | ConfigError:
    """What to raise when the checkpoint at `path` does not fit the model (`problem` says
    how; worker/checkpointing.py `restore`). The checkpoint's fault (CheckpointRefused: the
    supervisor quarantines it), unless an older checkpoint of the run has the very same
    adapter tensors (names and shapes): then the model is not the one the run trained, every
    checkpoint would be refused in turn, and it is the config's fault (ConfigError)."""
    mine = _adapter_shapes(path)
    step = ckpt.step_of(path)
    for info in ckpt.list_checkpoints(path.parent):
        if mine is None or step is None or info.step >= step or not info.has_manifest:
            continue
        if _adapter_shapes(info.path) == mine:
            return ConfigError(
                f"{path.name}: {problem}; the older {info.path.name} has the same tensors, so "
                "the model is not the one this run trained (was the model directory "
                "replaced?); restore it, or start over with --fresh (moves the run's "
                "checkpoints to RUN_DIR/previous/)")
    return CheckpointRefused(path, problem)


def _adapter_shapes(path: Path) -> dict[str, list[int]] | None:
    try:
        header, _ = read_header(path / ckpt.ADAPTERS)
    except (CheckpointError, OSError):
        return None
    return {name: list(info["shape"]) for name, info in header.items()}


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
