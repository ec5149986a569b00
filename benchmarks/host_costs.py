"""Part 1c: the per-step host work of the worker, measured per call — before and after.

Each item is what the worker did (or does) once per step outside the compiled MLX call,
timed in this process with `timeit` (the best of 5 repeats of N calls: on a shared machine
the minimum is the cost, the rest is other processes' load):

- the learning-rate read: `float(schedule(mx.array(step, mx.uint64)).item())` (a small MLX
  graph evaluated on its own) vs `float(optimizer.learning_rate.item())` on the rate the
  compiled step already evaluated;
- the spike detector's median/MAD over a 100-norm window: numpy before; after, the whole
  `SpikeDetector.observe` for a norm above the median (the costlier case: the MAD is
  computed; at or below the median it is not needed) on its kept-sorted window;
- a StepMetrics as a metrics.jsonl line: `dataclasses.asdict` and strictjson.dumps (which
  walks the dict again for non-finite floats) vs field by field (shared/protocol.py
  `_Message.to_dict`, which already writes them as strings) and json.dumps;
- the pre-update weights a fused step keeps to undo a rejected step: through
  `model.trainable_parameters()` vs slots found once (worker/train.py `_slots`);
- psutil's RSS read (now at report steps only);
- TensorBoard's five `add_scalar` calls (already at report steps only; for the record);
- the supervisor's decode of one step's metrics: a single StepMetrics message vs its share
  of a 16-step metrics_batch (shared/protocol.py `decode_all`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any


def best_us(fn: Callable[[], Any], number: int) -> float:
    """Microseconds per call: the best of 5 repeats of `number` calls."""
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def measure(number: int = 2000) -> dict[str, dict[str, float]]:
    """{item: {"before": us, "after": us}} ("after" absent: not changed, or gone)."""
    import random

    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np
    import psutil

    from shared import protocol as p
    from shared import strictjson

    out: dict[str, dict[str, float]] = {}
    schedule = optim.linear_schedule(0.0, 1e-4, 100)
    opt = optim.Adam(learning_rate=schedule)
    lr = schedule(mx.array(5, mx.uint64))
    mx.eval(lr)
    opt.state["learning_rate"] = lr
    out["learning-rate read"] = {
        "before": best_us(lambda: float(schedule(mx.array(5, mx.uint64)).item()), number),
        "after": best_us(lambda: float(opt.learning_rate.item()), number)}

    rng = random.Random(0)
    window = [rng.lognormvariate(0, 1) for _ in range(100)]

    def numpy_stats() -> float:
        h = np.asarray(window)
        med = float(np.median(h))
        return float(np.median(np.abs(h - med)))

    from shared.config import GradSpike
    from worker.monitors import SpikeDetector

    detector = SpikeDetector(GradSpike(threshold=1e9, robust_z=1e9))
    for i, x in enumerate(window):
        detector.observe(i, x)
    above = sorted(window)[60]  # above the median: the MAD is computed too

    def observe_above() -> None:
        detector.observe(200, above)
        # back to the same window for the next call (not part of a step's cost)
        detector.history.pop()
        detector.history.appendleft(window[len(window) - len(detector.history) - 1])
        detector._sorted = sorted(detector.history)

    out["spike check (100-norm window)"] = {
        "before": best_us(numpy_stats, number),
        "after": best_us(observe_above, number) - best_us(
            lambda: sorted(detector.history), number)}

    m = p.StepMetrics("r1", 1, 120, 1.7e9, 2.31, 0.82, 1e-5, 4096, 812.5, 5.04, 812.0,
                      900.1, 1400.2, 121, 96.0, 0.0)

    def asdict_line() -> str:
        d = dataclasses.asdict(m)
        d["type"], d["v"] = m.TYPE, p.PROTOCOL_VERSION
        return strictjson.dumps(d)

    out["metrics line (to_dict + JSON)"] = {
        "before": best_us(asdict_line, number),
        "after": best_us(lambda: json.dumps(m.to_dict(), allow_nan=False), number)}
    out["pre-update weights kept (tiny LoRA, 28 arrays)"] = _kept_weights(number)
    proc = psutil.Process(os.getpid())
    out["psutil RSS read"] = {"before": best_us(lambda: proc.memory_info().rss, number)}
    try:
        from tensorboardX import SummaryWriter

        with tempfile.TemporaryDirectory() as d:
            w = SummaryWriter(str(Path(d)), flush_secs=30)

            def five() -> None:
                for name in ("a", "b", "c", "d", "e"):
                    w.add_scalar(name, 1.0, 1)

            out["TensorBoard add_scalar x5"] = {"before": best_us(five, number // 4)}
            w.close()
    except ImportError:
        pass
    single = m.to_json()
    batch = p.StepMetricsBatch.fold([m] * 16).to_json()
    out["supervisor decode, per step"] = {
        "before": best_us(lambda: p.decode_all(single), number // 4),
        "after": best_us(lambda: p.decode_all(batch), number // 16) / 16}
    return out


def _kept_weights(number: int) -> dict[str, float]:
    """`tree_flatten(model.trainable_parameters())` (walks every module with filters) vs
    the slots worker/train.py finds once, on the tiny model with LoRA on both layers."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from worker.train import _slots

    model = llama.Model(llama.ModelArgs.from_dict({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "vocab_size": 384, "tie_word_embeddings": True}))
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 8, "scale": 20.0, "dropout": 0.0})
    slots = _slots(model.trainable_parameters(), model)
    return {"before": best_us(lambda: tree_flatten(model.trainable_parameters()), number // 4),
            "after": best_us(lambda: [parent[key] for parent, key in slots], number)}


def rows(res: Any, r: dict[str, dict[str, float]]) -> None:
    """One row per item: before and after, microseconds per call (per step)."""
    for item, v in r.items():
        after = v.get("after")
        res.add("1 host work", f"per step: {item}",
                f"{after:.1f} us" if after is not None else f"{v['before']:.1f} us",
                f"{v['before']:.1f} us before" if after is not None else "",
                f"{v['before'] / after:.1f}x" if after else "", "", None,
                "best of 5 x N calls, in process" + (
                    "" if after is not None else "; now at report steps only"
                    if "RSS" in item or "Board" in item else ""))
    res.raw["host_costs_us"] = r
