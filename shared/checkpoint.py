"""The checkpoint contract between worker and supervisor.

    checkpoints/step-0000250/
      adapters.safetensors     trainable weights, loadable by `mlx_lm generate --adapter-path`
      adapter_config.json      mlx_lm's adapter config (fine_tune_type, num_layers, lora_parameters)
      optimizer.safetensors    the full optimizer state (moments, step, learning rate)
      trainer_state.json       shared/trainer_state.py: everything else resume needs
      manifest.json            written last: sha256 and size of every other file

A checkpoint is written into `checkpoints/.tmp-step-0000250-<pid>/`, every file fsynced,
the manifest written last, the directory renamed into place and its parent fsynced. A
directory without a valid manifest does not exist as far as anyone is concerned.

Validation (`validate`) reads every byte: the hashes, every tensor's values. It is done once
per start: by the supervisor before it spawns a worker, which passes the sha256 of the
manifest it validated (`--validated SHA256`); the worker then re-checks only that the
manifest is the same one, the file sizes and the trainer state (`trusted_manifest`). A
worker started by hand validates fully itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from shared import trainer_state
from shared.errors import CheckpointError
from shared.fsutil import fsync_dir, fsync_file, write_json_synced
from shared.layout import CHECKPOINT_PREFIX
from shared.safetensors_check import check_finite, read_header
from shared.trainer_state import TrainerState

MANIFEST = "manifest.json"
ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.safetensors"
TRAINER_STATE = "trainer_state.json"
REQUIRED_FILES = (ADAPTERS, ADAPTER_CONFIG, OPTIMIZER, TRAINER_STATE)
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path

    @property
    def has_manifest(self) -> bool:
        return (self.path / MANIFEST).is_file()


@dataclass(frozen=True)
class Validation:
    """The verdict on one checkpoint. `state`: its decoded trainer_state.json (when ok);
    `manifest_sha256`: the manifest that was checked, for a later `trusted_manifest`."""

    ok: bool
    reason: str = ""
    state: TrainerState | None = None
    manifest_sha256: str = ""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX):
        return None
    digits = name[len(CHECKPOINT_PREFIX) :]
    return int(digits) if digits.isdigit() else None


def list_checkpoints(checkpoints_dir: Path) -> list[CheckpointInfo]:
    """Checkpoint directories, newest (highest step) first; manifest or not."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for p in checkpoints_dir.iterdir():
        step = step_of(p)
        if step is not None and p.is_dir():
            found.append(CheckpointInfo(step, p))
    return sorted(found, key=lambda c: c.step, reverse=True)


def write_checkpoint(
    checkpoints_dir: Path,
    step: int,
    write_files: Callable[[Path], None],
    before_manifest: Callable[[Path], None] | None = None,
) -> Path:
    """Atomically create checkpoints/step-NNNNNNN by calling write_files(tmp_dir).

    `before_manifest` is a hook for fault injection (die after the data files are written
    but before the manifest); production code passes None.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = checkpoints_dir / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_files(tmp)
    files = {}
    for f in sorted(tmp.iterdir()):
        fsync_file(f)
        files[f.name] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    missing = [n for n in REQUIRED_FILES if n not in files]
    if missing:
        raise CheckpointError(f"{tmp}: writer did not produce {missing}")
    if before_manifest is not None:
        before_manifest(tmp)
    write_json_synced(tmp / MANIFEST, {"step": step, "created": time.time(), "files": files})
    fsync_dir(tmp)
    if final.exists():
        # Re-saving a step (after a rollback): move the old one aside first so that at
        # every instant one complete checkpoint for this step exists.
        old = checkpoints_dir / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(checkpoints_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        fsync_dir(checkpoints_dir)
    return final


def manifest_sha256(path: Path) -> str:
    """The sha256 of a checkpoint's manifest.json: names the checkpoint's exact contents."""
    return hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()


def validate(path: Path, deep: bool = True, trusted_manifest: str | None = None) -> Validation:
    """Check one checkpoint: manifest, sizes, hashes, tensors readable and finite, trainer
    state decodable (shared/trainer_state.py) and consistent with the directory.

    deep=False checks only the manifest, the file sizes and the trainer state (fast, for
    listings). `trusted_manifest`: the sha256 of a manifest someone else validated deeply
    (the supervisor); when the manifest still has it, the check is the shallow one.
    """
    try:
        state, sha = _validate(path, deep, trusted_manifest)
    except CheckpointError as e:
        return Validation(False, str(e))
    except OSError as e:
        return Validation(False, f"{path}: {e.strerror or e}")
    return Validation(True, "", state, sha)


def _validate(path: Path, deep: bool, trusted: str | None) -> tuple[TrainerState, str]:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path.name}: no {MANIFEST} (incomplete write)")
    raw = manifest_path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    if trusted is not None and trusted == sha:
        deep = False
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name}: {MANIFEST} is not a valid manifest") from None
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"{path.name}: manifest does not list {name}")
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path.name}: {name} listed in manifest but missing")
        size = f.stat().st_size
        if size != meta.get("bytes"):
            raise CheckpointError(
                f"{path.name}/{name}: expected {meta.get('bytes')} bytes, got {size}"
            )
        if deep and sha256_file(f) != meta.get("sha256"):
            raise CheckpointError(f"{path.name}/{name}: sha256 does not match the manifest")
    state = trainer_state.load(path / TRAINER_STATE, f"{path.name}/{TRAINER_STATE}")
    _check_state(path, state)
    if deep:
        adapters, _ = read_header(path / ADAPTERS)
        if not adapters:
            raise CheckpointError(f"{path.name}/{ADAPTERS}: contains no tensors")
        read_header(path / OPTIMIZER)
        for name in (ADAPTERS, OPTIMIZER):
            bad = check_finite(path / name)
            if bad:
                raise CheckpointError(
                    f"{path.name}/{name}: non-finite values in {len(bad)} tensors, e.g. {bad[0]}"
                )
        try:
            json.loads((path / ADAPTER_CONFIG).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path.name}/{ADAPTER_CONFIG}: not valid JSON") from None
    return state, sha


def _check_state(path: Path, state: TrainerState) -> None:
    dir_step = step_of(path)
    if dir_step is not None and state.step != dir_step:
        raise CheckpointError(
            f"{path.name}/{TRAINER_STATE}: step {state.step} does not match directory"
        )
    if not (0 <= state.step <= state.total_steps):
        raise CheckpointError(
            f"{path.name}/{TRAINER_STATE}: step {state.step} outside 0..{state.total_steps}"
        )


def newest_valid(
    checkpoints_dir: Path,
    on_invalid: Callable[[CheckpointInfo, str], None] | None = None,
    before_step: int | None = None,
) -> tuple[CheckpointInfo, Validation] | None:
    """The newest checkpoint that validates deeply (optionally with step < before_step), and
    its validation; `on_invalid` hears of each one that does not."""
    for info in list_checkpoints(checkpoints_dir):
        if before_step is not None and info.step >= before_step:
            continue
        result = validate(info.path)
        if result.ok:
            return info, result
        if on_invalid is not None:
            on_invalid(info, result.reason)
    return None


def quarantine(info: CheckpointInfo, quarantine_dir: Path) -> Path:
    """Move an invalid checkpoint aside (never delete evidence)."""
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    target = quarantine_dir / f"{info.path.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    n = 1
    while target.exists():
        target = target.with_name(f"{target.name}.{n}")
        n += 1
    os.replace(info.path, target)
    fsync_dir(info.path.parent)
    return target


def retention_victims(
    checkpoints: Iterable[CheckpointInfo], keep_last: int, best_step: int | None
) -> list[CheckpointInfo]:
    """Complete checkpoints to delete: all but the newest `keep_last` and the best.

    Incomplete ones (no manifest) are left for the supervisor's validator to quarantine.
    """
    complete = [c for c in checkpoints if c.has_manifest]
    keep = {c.step for c in complete[: max(keep_last, 1)]}
    if best_step is not None:
        keep.add(best_step)
    return [c for c in complete if c.step not in keep]


def apply_retention(checkpoints_dir: Path, keep_last: int, best_step: int | None) -> list[int]:
    victims = retention_victims(list_checkpoints(checkpoints_dir), keep_last, best_step)
    for c in victims:
        shutil.rmtree(c.path, ignore_errors=True)
    for stale in checkpoints_dir.glob(f"{TMP_PREFIX}*"):
        # Temp dirs of processes that are gone are half-written checkpoints: garbage.
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    return [c.step for c in victims]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
