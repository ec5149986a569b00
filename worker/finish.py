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
from shared.fsutil import atomic_write_json, fsync_dir
from shared.layout import RunDir
from worker.train import Outcome, Trainer

log = structlog.get_logger("worker")


def mlx_lm_test_pass(trainer: Trainer, test_set: Any, c: Config) -> dict[str, Any]:
    """mlx_lm's test pass (`mlx_lm lora --test`): the loss of the trained model on
    test.jsonl, over test_batches x batch_size examples (a fixed subset; -1 = all)."""
    from worker.batching import fixed_subset

    tic = time.perf_counter()
    n = (
        len(test_set)
        if c.test_batches < 0
        else min(c.test_batches * c.batch_size, len(test_set))
    )
    loss = trainer.evaluate(test_set, fixed_subset(len(test_set), n, c.seed))
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
    run: RunDir, config: Config, trainer: Trainer, outcome: Outcome,
    test: dict[str, Any] | None = None,
) -> None:
    """A completed (or early-stopped) run: its final adapters in RUN_DIR/adapters (and
    adapter_path), and the COMPLETE marker that ends it."""
    last = trainer.writer.last
    assert last is not None
    publish_adapters(last.path, run.adapters)
    if config.adapter_path:
        publish_adapters(last.path, Path(config.adapter_path).expanduser().resolve())
    s = trainer.state
    atomic_write_json(
        run.complete_marker,
        {
            "status": outcome.reason,
            "step": s.step,
            "total_steps": config.iters,
            "final_checkpoint": str(last.path),
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



def publish_adapters(checkpoint: Path, dest: Path) -> None:
    """Place adapters.safetensors + adapter_config.json at dest, replacing it atomically."""
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
