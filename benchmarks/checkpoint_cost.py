"""Part 5: what a checkpoint costs — time training is blocked, size, validation time.

Two measurements:
- in process, on real LoRA adapters and Adam moments: `worker.checkpointing.snapshot` +
  `CheckpointWriter.save` exactly as `Trainer.save` calls them, synchronous and
  `checkpoints.async_save: true` alternated; "blocked" is the time until `save` returns (the
  training thread's cost), "total" until the files are complete; then
  `shared.checkpoint.validate` (deep: hashes + finite values) of the result;
- in a real `overnight train` run (tiny model): the second epoch's time with a checkpoint
  every few steps, sync and async, minus the same epoch without checkpoints, per checkpoint.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks.common import median, read_jsonl
from benchmarks.throughput import Workload, run_ours


def _trainer_state(step: int, config: dict[str, Any]) -> Any:
    """The shape and size of what Trainer.trainer_state writes (50-step histories)."""
    from shared import trainer_state as ts
    from shared.config_identity import config_hash

    return ts.decode({
        "step": step, "total_steps": 2000, "data_position": step, "groups_per_epoch": 500,
        "rng": {"scheme": "seed(seed*1000003 + step*1009 + micro_batch)", "seed": 0},
        "early_stopping": {"best": 2.0, "best_step": step, "bad_evals": 0},
        "grad_spike": {"history": [1.0] * 100, "consecutive": 0, "first_bad_step": -1},
        "best": {"val_loss": 2.0, "step": step}, "last_val_loss": 2.0, "val_examples": 100,
        "batch": {"batch_size": 4, "grad_accumulation_steps": 1, "effective": 4},
        "config_hash": config_hash(config), "config": config, "lr_scale": 1.0, "lr": 1e-4,
        "loss_history": [2.0] * 50, "step_seconds": [1.0] * 50, "step_tokens": [400] * 50,
        "tokens_total": 400 * step, "train_seconds": float(step), "reason": "periodic",
        "run_id": "bench", "attempt": 1, "time": time.time(),
        "versions": {"mlx": "x", "mlx-lm": "x", "mlx-overnight": "x"},
        "data": {"train_fingerprint": "0" * 16, "train_examples": 2000, "malformed_lines": 0},
    }, "benchmark trainer state")


def in_process(model_dir: Path, num_layers: int, rank: int, work: Path, reps: int,
               log: Any = print) -> dict[str, Any]:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_map
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load

    from shared import checkpoint as ckpt
    from shared.config import resolve
    from worker.checkpointing import CheckpointWriter, snapshot

    model, _ = load(str(model_dir))
    model.freeze()
    linear_to_lora_layers(model, num_layers, {"rank": rank, "scale": 20.0, "dropout": 0.0})
    opt = optim.Adam(learning_rate=1e-4)
    opt.init(model.trainable_parameters())
    grads = tree_map(lambda p: mx.full(p.shape, 1e-3, p.dtype), model.trainable_parameters())
    opt.update(model, grads)  # non-zero moments, as after a real step
    mx.eval(model.parameters(), opt.state)
    lora = {"rank": rank, "scale": 20.0, "dropout": 0.0}
    # what the validator checks the adapters against (shared/checkpoint_tensors.py)
    config = resolve({"model": str(model_dir), "data": "data", "num_layers": num_layers,
                      "lora_parameters": lora}).to_dict()
    adapter_config = {"fine_tune_type": "lora", "num_layers": num_layers,
                      "lora_parameters": lora}
    shutil.rmtree(work, ignore_errors=True)
    writers = {mode: CheckpointWriter(work / mode, keep_last=3, async_save=mode == "async")
               for mode in ("sync", "async")}
    for w in writers.values():
        w.dir.mkdir(parents=True)
    times: dict[str, dict[str, list[float]]] = {
        m: {"blocked": [], "total": []} for m in writers}
    validate_s: list[float] = []
    size = 0
    for r in range(reps):
        for mode in (("sync", "async") if r % 2 == 0 else ("async", "sync")):
            w = writers[mode]
            step = 10 * (r + 1)
            t0 = time.perf_counter()
            adapters, opt_state = snapshot(model, opt)
            w.save(step, adapters, opt_state, adapter_config, _trainer_state(step, config),
                   None, lambda saved: None)
            blocked = time.perf_counter() - t0
            w.wait()
            times[mode]["blocked"].append(blocked)
            times[mode]["total"].append(time.perf_counter() - t0)
            assert w.last is not None
            size = w.last.bytes
            t1 = time.perf_counter()
            result = ckpt.validate(w.last.path)
            validate_s.append(time.perf_counter() - t1)
            if not result.ok:
                raise RuntimeError(f"benchmark checkpoint invalid: {result.reason}")
    out = {
        "model": model_dir.name, "num_layers": num_layers, "rank": rank,
        "trainable_params": sum(v.size for v in adapters.values()),
        "bytes": size,
        "sync_blocked_s": median(times["sync"]["blocked"]),
        "async_blocked_s": median(times["async"]["blocked"]),
        "async_total_s": median(times["async"]["total"]),
        "sync_total_s": median(times["sync"]["total"]),
        "validate_s": median(validate_s), "reps": reps, "raw": times,
    }
    log(f"  checkpoint {model_dir.name} ({num_layers} layers): {size / 1e6:.1f} MB, blocked "
        f"sync {out['sync_blocked_s'] * 1000:.1f} ms / async {out['async_blocked_s'] * 1000:.1f}"
        f" ms, validate {out['validate_s'] * 1000:.1f} ms")
    return out


def in_training(w: Workload, work: Path, openblas: bool, every: int, reps: int,
                log: Any = print) -> dict[str, Any]:
    """Extra time per checkpoint in a real run, sync and async: within one run, the median
    gap between two steps' metrics lines when a checkpoint was saved between them, minus
    the median gap when none was (robust to run-to-run noise); and the epoch-time
    difference against a run without checkpoints."""
    e = w.steps_per_epoch
    n = 2 * e // every - e // every  # checkpoints after steps E+1 .. 2E
    saving = replace(w, save_every=every)
    epochs: dict[str, list[float]] = {"none": [], "sync": [], "async": []}
    gaps: dict[str, list[float]] = {"sync": [], "async": []}
    for r in range(reps):
        for mode in ("none", "sync", "async") if r % 2 == 0 else ("async", "sync", "none"):
            sections: dict[str, Any] = {}
            if mode != "none":
                sections = {"checkpoints": {"async_save": mode == "async", "keep_last": 2}}
            s = run_ours(w if mode == "none" else saving, work / mode, openblas, f"ckpt-{r}",
                         **sections)
            epochs[mode].append(s.epoch_s)
            if mode != "none":
                gaps[mode].append(_gap_cost(work / mode / f"run-ckpt-{r}", every, e))
    base = median(epochs["none"])
    out = {"every": every, "checkpoints_in_epoch": n, "epoch_s": epochs,
           "sync_blocked_s": median(gaps["sync"]), "async_blocked_s": median(gaps["async"]),
           "sync_epoch_delta_s": (median(epochs["sync"]) - base) / n,
           "async_epoch_delta_s": (median(epochs["async"]) - base) / n}
    log(f"  checkpoint in training ({w.name}): sync +{out['sync_blocked_s'] * 1000:.1f} ms, "
        f"async +{out['async_blocked_s'] * 1000:.1f} ms per checkpoint (step gaps)")
    return out


def _gap_cost(rd: Path, every: int, e: int) -> float:
    """Median step gap after a checkpoint minus the median gap after none, steps > E."""
    t = {m["step"]: m["time"] for m in read_jsonl(rd / "logs" / "metrics.jsonl")}
    steps = [s for s in range(e + 1, 2 * e + 1) if s + 1 in t]
    after = [t[s + 1] - t[s] for s in steps if s % every == 0]
    plain = [t[s + 1] - t[s] for s in steps if s % every]
    return median(after) - median(plain)
