"""Save and restore the worker's training state through the shared checkpoint contract.

Saving can run synchronously or in a background thread (`checkpoints.async_save`): MLX
arrays are immutable and already evaluated, so the writer holds references to exactly the
values of this step while training moves on to new arrays. Atomicity is the same either
way — `shared.checkpoint.write_checkpoint` renames a complete, manifested directory into
place — and only one save is in flight at a time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import checkpoint as ckpt
from shared.errors import CheckpointError
from shared.fsutil import write_json_synced
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
    optimizer (its trainer state is the one the validation decoded)."""
    import mlx.core as mx

    adapters = mx.load(str(path / ckpt.ADAPTERS))
    expected = {k for k, _ in _flat(model.trainable_parameters())}
    if set(adapters) != expected:
        missing, extra = sorted(expected - set(adapters)), sorted(set(adapters) - expected)
        raise CheckpointError(
            f"{path.name}: adapters do not match the model (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); was it written with another config?"
        )
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
        raise CheckpointError(f"{path.name}: optimizer state does not match ({diff} ...)")
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
            path = ckpt.write_checkpoint(self.dir, step, write_files, self.before_manifest)
            ckpt.apply_retention(self.dir, self.keep_last, best_step)
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

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
