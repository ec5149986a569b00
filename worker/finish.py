"""What a completed run leaves: mlx_lm's test pass, the final adapters, the COMPLETE marker.

The adapters are published from the last checkpoint in mlx_lm's layout
(`--adapter-path RUN_DIR/adapters`), atomically; COMPLETE records the final and best steps
(and the test loss): a run with it is not trained again.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import structlog

from shared import checkpoint as ckpt
from shared.config import Config
from shared.errors import ConfigError
from shared.fsutil import atomic_write_json, fsync_dir
from shared.layout import RunDir, cannot_create
from worker.train import Outcome, Trainer

log = structlog.get_logger("worker")


def test_subset(test_set: Any, c: Config) -> Any:
    """The test pass's examples (int64 indices): test_batches x batch_size of them, a fixed
    subset, or all with test_batches: -1."""
    from worker.batching import fixed_subset

    n = len(test_set) if c.test_batches < 0 else c.test_batches * c.batch_size
    return fixed_subset(len(test_set), min(n, len(test_set)), c.seed)


def mlx_lm_test_pass(trainer: Trainer, test_set: Any, c: Config,
                     usable: int | None = None) -> dict[str, Any]:
    """mlx_lm's test pass (`mlx_lm lora --test`): the loss of the trained model on
    test.jsonl, over test_batches x batch_size examples (a fixed subset; -1 = all).
    `usable`: streaming's count of the subset's rows that tokenise (counted at load)."""
    tic = time.perf_counter()
    subset = test_subset(test_set, c)
    n = usable if usable is not None else len(subset)
    loss = trainer.evaluate(test_set, subset)
    ppl = math.exp(loss) if math.isfinite(loss) and loss < 700 else math.inf
    result = {"test_loss": loss, "test_ppl": ppl, "test_examples": n}
    log.info(
        "tested",
        step=trainer.state.step,
        seconds=time.perf_counter() - tic,
        path=str(test_set.index.path),
        **result,
    )
    print(
        f"overnight train: test loss {loss:.3f}, test ppl {ppl:.3f} ({n} examples of "
        f"{test_set.index.path.name})",
        file=sys.stderr,
        flush=True,
    )
    return result


def finish(
    run: RunDir, config: Config, trainer: Trainer, outcome: Outcome, final: Path,
    adapter_dir: Path | None, test: dict[str, Any] | None = None,
) -> None:
    """A completed (or early-stopped) run: its final adapters (from the `final` checkpoint) in
    RUN_DIR/adapters and, as mlx_lm writes them, in `adapter_dir` (mlx_lm's adapter_path,
    created at start), and the COMPLETE marker that ends it."""
    publish_adapters(final, run.adapters)
    if adapter_dir is not None:
        try:
            copy_adapters_into(final, adapter_dir)
        except OSError as e:  # the adapters are in RUN_DIR/adapters all the same
            log.warning("adapter_path_not_written", path=str(adapter_dir), error=str(e))
            print(
                f"overnight train: adapter_path: {adapter_dir}: not written ({e}); the "
                f"final adapters are in {run.adapters}",
                file=sys.stderr,
                flush=True,
            )
    s = trainer.state
    atomic_write_json(
        run.complete_marker,
        {
            "status": outcome.reason,
            "step": s.step,
            "total_steps": config.iters,
            "final_checkpoint": str(final),
            "adapters": str(run.adapters),
            "best_step": s.best_step,
            "best_val_loss": s.best_val,
            "time": time.time(),
            **(test or {}),
        },
    )
    log.info(
        "run_complete",
        status=outcome.reason,
        step=s.step,
        adapters=str(run.adapters),
        best_step=s.best_step,
        best_val_loss=s.best_val,
    )


def copy_adapters_into(checkpoint: Path, dest: Path) -> None:
    """Write adapters.safetensors + adapter_config.json into `dest` as `mlx_lm lora` writes
    its `adapter_path`: each file replaced atomically, everything else in `dest` left alone."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (ckpt.ADAPTERS, ckpt.ADAPTER_CONFIG):
        tmp = dest / f".{name}.tmp-{os.getpid()}"
        shutil.copy2(checkpoint / name, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest / name)
    fsync_dir(dest)


def publish_adapters(checkpoint: Path, dest: Path) -> None:
    """Place adapters.safetensors + adapter_config.json at dest, replacing it atomically.
    Only for a directory this run owns (RUN_DIR/adapters): whatever else is in it goes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name in (ckpt.ADAPTERS, ckpt.ADAPTER_CONFIG):
        shutil.copy2(checkpoint / name, tmp / name)
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(tmp)
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)


def make_adapter_dir(c: Config) -> Path | None:
    """mlx_lm's `adapter_path`, created at start as `mlx_lm lora` does, so a path that
    cannot be a directory is one line now rather than a failure after the night."""
    if not c.adapter_path:
        return None
    path = Path(c.adapter_path).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"adapter_path: {cannot_create(path, e, 'adapter directory')}"
        ) from None
    return path
