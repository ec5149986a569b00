"""Save and restore the worker's training state through the shared checkpoint contract.

Saving can run synchronously or in a background thread (`checkpoints.async_save`): MLX
arrays are immutable and already evaluated, so the writer holds references to exactly the
values of this step while training moves on to new arrays. Atomicity is the same either
way — `shared.checkpoint.write_checkpoint` renames a complete, manifested directory into
place — and only one save is in flight at a time.

A save that fails for want of space (ENOSPC/EDQUOT, or MLX's "[write] Unable to write" with
less free space than the checkpoint needs) leaves no temp directory and raises `DiskFull`
naming the path, the checkpoint's size and the free space; the worker exits DISK_FULL and the
supervisor waits for space (shared/exitcodes.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import checkpoint as ckpt
from shared.errors import CheckpointRefused, DiskFull
from shared.fsutil import (
    disk_full_message,
    human_bytes,
    is_disk_full,
    is_mlx_write_failure,
    looks_full,
    write_json_synced,
)
from shared.trainer_state import TrainerState


@dataclass(frozen=True)
class SavedCheckpoint:
    step: int
    path: Path
    seconds: float
    blocked_seconds: float
    bytes: int


def snapshot(model: Any, optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    from mlx.utils import tree_flatten

    adapters = dict(tree_flatten(model.trainable_parameters()))
    opt_state = dict(tree_flatten(optimizer.state))
    return adapters, opt_state


def restore(path: Path, model: Any, optimizer: Any) -> None:
    """Load adapters and optimizer state from a validated checkpoint into the model and the
    optimizer (its trainer state is the one the validation decoded). Tensors that do not fit
    (a name missing or extra, a shape the model's parameter does not have — load_weights
    with strict=False would take a wrong shape silently) are refused before anything is
    loaded: CheckpointRefused, or ConfigError when the model changed (worker/resume.py)."""
    import mlx.core as mx

    from worker.resume import not_fitting

    adapters = mx.load(str(path / ckpt.ADAPTERS))
    expected = dict(_flat(model.trainable_parameters()))
    if set(adapters) != set(expected):
        missing = sorted(set(expected) - set(adapters))
        extra = sorted(set(adapters) - set(expected))
        raise not_fitting(path, f"adapters.safetensors does not fit the model: "
                                f"{len(missing)} tensors missing {missing[:3]}, {len(extra)} "
                                f"unexpected {extra[:3]}")
    wrong = [f"{k} {list(adapters[k].shape)}, the model's {list(v.shape)}"
             for k, v in sorted(expected.items()) if tuple(adapters[k].shape) != tuple(v.shape)]
    if wrong:
        raise not_fitting(path, f"adapters.safetensors does not fit the model: {len(wrong)} "
                                f"tensors of another shape, e.g. {wrong[0]}")
    model.load_weights(list(adapters.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    saved = mx.load(str(path / ckpt.OPTIMIZER))
    _assign_flat(optimizer.state, saved, path)
    mx.eval(model.parameters(), optimizer.state)


def _flat(tree: Any) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _assign_flat(state: dict[str, Any], flat: dict[str, Any], path: Path) -> None:
    """Write saved values into the optimizer's existing state tree, in place.

    In place matters: compiled step functions hold a reference to this very dict.
    """
    current = dict(_flat(state))
    if set(current) != set(flat):
        diff = sorted(set(current) ^ set(flat))[:3]
        raise CheckpointRefused(path, f"optimizer.safetensors does not fit the optimizer "
                                      f"({diff} ...)")
    wrong = [f"{k} {list(v.shape)}, the optimizer's {list(current[k].shape)}"
             for k, v in sorted(flat.items())
             if hasattr(current[k], "shape") and tuple(v.shape) != tuple(current[k].shape)]
    if wrong:
        raise CheckpointRefused(path, f"optimizer.safetensors does not fit the optimizer: "
                                      f"{len(wrong)} entries of another shape, e.g. {wrong[0]}")
    for key, value in flat.items():
        node: Any = state
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node[p]
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value


class CheckpointWriter:
    def __init__(
        self,
        checkpoints_dir: Path,
        keep_last: int,
        async_save: bool,
        before_manifest: Callable[[Path], None] | None = None,
    ):
        self.dir = checkpoints_dir
        self.keep_last = keep_last
        self.async_save = async_save
        self.before_manifest = before_manifest
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last: SavedCheckpoint | None = None

    def save(
        self,
        step: int,
        adapters: dict[str, Any],
        opt_state: dict[str, Any],
        adapter_config: dict[str, Any],
        trainer_state: TrainerState,
        best_step: int | None,
        on_saved: Callable[[SavedCheckpoint], None],
    ) -> None:
        self.wait()
        started = time.perf_counter()

        def write_files(tmp: Path) -> None:
            import mlx.core as mx

            mx.save_safetensors(str(tmp / ckpt.ADAPTERS), adapters, metadata={"format": "mlx"})
            mx.save_safetensors(str(tmp / ckpt.OPTIMIZER), opt_state)
            write_json_synced(tmp / ckpt.ADAPTER_CONFIG, adapter_config)
            write_json_synced(tmp / ckpt.TRAINER_STATE, trainer_state.to_dict())

        def run(blocked: float | None) -> None:
            """blocked=None: synchronous, training waits for the whole save."""
            try:
                path = ckpt.write_checkpoint(self.dir, step, write_files, self.before_manifest)
                ckpt.apply_retention(self.dir, self.keep_last, best_step)
            except Exception as e:
                full = self._disk_full(e, step, _nbytes(adapters) + _nbytes(opt_state))
                if full is None:
                    raise
                raise full from e
            size = sum(f.stat().st_size for f in path.iterdir())
            seconds = time.perf_counter() - started
            self.last = SavedCheckpoint(
                step, path, seconds, seconds if blocked is None else blocked, size
            )
            on_saved(self.last)

        if not self.async_save:
            run(None)
            return

        def guarded(blocked: float) -> None:
            try:
                run(blocked)
            except BaseException as e:  # re-raised in the training thread by wait()
                self._error = e

        self._thread = threading.Thread(
            target=guarded, args=(time.perf_counter() - started,), name="checkpoint-writer"
        )
        self._thread.start()

    def _disk_full(self, e: BaseException, step: int, nbytes: int) -> DiskFull | None:
        """`e` as a DiskFull (None when it is another failure). MLX's short write keeps no
        errno: it counts when the file system has less room than the checkpoint needs."""
        if not (is_disk_full(e) or (is_mlx_write_failure(e) and looks_full(self.dir, nbytes))):
            return None
        what = f"the step {step} checkpoint of {human_bytes(nbytes)}"
        return DiskFull(disk_full_message(e, self.dir, what))

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err


def _nbytes(arrays: dict[str, Any]) -> int:
    """Bytes of the tensors about to be written (what a checkpoint file needs, roughly)."""
    return sum(int(getattr(a, "nbytes", 0)) for a in arrays.values())
