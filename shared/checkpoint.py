"""The checkpoint contract between worker and supervisor.

    checkpoints/step-0000250/
      adapters.safetensors     trainable weights, loadable by `mlx_lm generate --adapter-path`
      adapter_config.json      mlx_lm's adapter config (fine_tune_type, num_layers, lora_parameters)
      optimizer.safetensors    the full optimizer state (moments, step, learning rate)
      trainer_state.json       shared/trainer_state.py: everything else resume needs
      manifest.json            written last: sha256 and size of every other file

A checkpoint is written into `checkpoints/.tmp-step-0000250-<pid>/`, every file fsynced,
the manifest written last, the directory renamed into place and its parent fsynced. A
directory without a valid manifest does not exist as far as anyone is concerned. A write that
fails (a full disk) removes its temp directory before the error goes on.

Deleting is renaming first: retention (and the replaced copy when a step is saved again)
renames a checkpoint to `checkpoints/.deleting-step-0000250-<pid>/` and only then removes
it, so a kill in the middle of a delete never leaves a half-deleted `step-*` directory.
`clean_leftovers()`, run at start by the worker and the supervisor, and by the supervisor
when a worker has ended (each holds the run lock, or is the only one of its processes that
runs: no other writer exists), removes what a killed writer left: `.deleting-*` and `.tmp-*`
directories (a complete temp checkpoint whose step is missing is put in place instead: a
kill between the two renames of a re-save).

Validation (`validate`) reads every byte: the hashes, every tensor's values; and, from the
headers, that the files agree with each other as the worker needs them to (the trainer
state with itself, the tensors with the optimizer state and both configs:
shared/checkpoint_tensors.py) — a checkpoint that validates is one the worker can load,
short of what only the model can tell (worker/checkpointing.py refuses those by name and
the supervisor quarantines them). It is done once
per start: by the supervisor before it spawns a worker, which passes the sha256 of the
manifest it validated (`--validated SHA256`); the worker then re-checks only that the
manifest is the same one, the file sizes and the trainer state (`trusted_manifest`). A
worker started by hand validates fully itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from shared import checkpoint_tensors, strictjson, trainer_state
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
DELETING_PREFIX = ".deleting-"


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
    try:
        _fill(tmp, step, write_files, before_manifest)
    except BaseException:
        # A full disk (or any failure) leaves no half-written directory behind.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        # Re-saving a step (after a rollback): move the old one aside first so that at
        # every instant one complete checkpoint for this step exists (clean_leftovers puts
        # the new one in place if a kill comes between the two renames).
        old = checkpoints_dir / f"{DELETING_PREFIX}{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(checkpoints_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
        fsync_dir(checkpoints_dir)
    return final


def _fill(
    tmp: Path,
    step: int,
    write_files: Callable[[Path], None],
    before_manifest: Callable[[Path], None] | None,
) -> None:
    """The files of a checkpoint in its temp directory, the manifest last."""
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
        manifest = strictjson.loads(raw)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):  # strictjson: any bad bytes are a ValueError
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
    _check_agreement(path, state)  # headers only: shallow checks include it
    if deep:
        for name in (ADAPTERS, OPTIMIZER):
            bad = check_finite(path / name)
            if bad:
                raise CheckpointError(
                    f"{path.name}/{name}: non-finite values in {len(bad)} tensors, e.g. {bad[0]}"
                )
    return state, sha


def _check_agreement(path: Path, state: TrainerState) -> None:
    """What the worker needs the files to agree on, from headers and small JSON files:
    the trainer state with itself, the tensors with each other and with the configs
    (shared/trainer_state.py, shared/checkpoint_tensors.py). The worker runs the same
    checks (it validates too, trusting only the hashes), so a checkpoint that passes here
    is not refused there for any of these."""
    odd = state.inconsistency()
    if odd:
        raise CheckpointError(f"{path.name}/{TRAINER_STATE}: {odd}")
    adapters, _ = read_header(path / ADAPTERS)
    if not adapters:
        raise CheckpointError(f"{path.name}/{ADAPTERS}: contains no tensors")
    optimizer, _ = read_header(path / OPTIMIZER)
    try:
        adapter_config = strictjson.loads((path / ADAPTER_CONFIG).read_bytes())
    except ValueError:
        raise CheckpointError(f"{path.name}/{ADAPTER_CONFIG}: not valid JSON") from None
    if not isinstance(adapter_config, dict):
        raise CheckpointError(f"{path.name}/{ADAPTER_CONFIG}: expected a JSON object, got "
                              f"{type(adapter_config).__name__}")
    found = checkpoint_tensors.problems(adapters, optimizer, adapter_config, state.config)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise CheckpointError(f"{path.name}: {found[0]}{more}")


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
    """Complete checkpoints to delete: all but the newest `keep_last`, the best, and the
    newest one that validates (shallow: manifest, sizes, trainer state) — when newer ones
    with a manifest do not validate, deleting it would leave nothing to resume from.

    Incomplete ones (no manifest) are left for the supervisor's validator to quarantine.
    """
    complete = [c for c in checkpoints if c.has_manifest]
    keep = {c.step for c in complete[: max(keep_last, 1)]}
    if best_step is not None:
        keep.add(best_step)
    newest_valid_one = next((c for c in complete if validate(c.path, deep=False).ok), None)
    if newest_valid_one is not None:
        keep.add(newest_valid_one.step)
    return [c for c in complete if c.step not in keep]


def apply_retention(checkpoints_dir: Path, keep_last: int, best_step: int | None) -> list[int]:
    """Delete what retention does not keep (`retention_victims`), each renamed aside first
    (`delete`); returns the deleted steps. Also removes stale temp directories."""
    victims = retention_victims(list_checkpoints(checkpoints_dir), keep_last, best_step)
    for c in victims:
        delete(c.path)
    clean_leftovers(checkpoints_dir)
    return [c.step for c in victims]


def delete(path: Path) -> None:
    """Delete a checkpoint directory: rename it to `.deleting-<name>-<pid>` (one atomic
    step: from then on it is no checkpoint), fsync the parent, then remove it. A kill in
    the middle leaves a `.deleting-*` directory, which `clean_leftovers` removes."""
    aside = path.with_name(f"{DELETING_PREFIX}{path.name}-{os.getpid()}")
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
    os.replace(path, aside)
    fsync_dir(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def clean_leftovers(checkpoints_dir: Path) -> list[str]:
    """Remove what killed writers left in `checkpoints_dir`: `.deleting-*` directories
    (half-deleted checkpoints) and `.tmp-*` ones of other processes (half-written ones).
    A temp checkpoint that is complete (its manifest is written last) and whose step
    directory is missing is renamed into place instead. The caller holds the run lock, so
    no other process writes here. Returns the names removed or restored ("name -> step-N")."""
    if not checkpoints_dir.is_dir():
        return []
    mine = f"-{os.getpid()}"
    done = []
    for p in sorted(checkpoints_dir.iterdir()):
        if not p.is_dir() or p.name.endswith(mine):
            continue
        if p.name.startswith(DELETING_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
            done.append(p.name)
        elif p.name.startswith(TMP_PREFIX):
            final = checkpoints_dir / p.name[len(TMP_PREFIX):].rsplit("-", 1)[0]
            if step_of(final) is not None and not final.exists() and (p / MANIFEST).is_file():
                os.replace(p, final)
                done.append(f"{p.name} -> {final.name}")
            else:
                shutil.rmtree(p, ignore_errors=True)
                done.append(p.name)
    if done:
        fsync_dir(checkpoints_dir)
    return done
