"""A complete trainer state (shared/trainer_state.py) for checkpoints written by tests and by
the fake worker: every required field, nothing trained."""

from __future__ import annotations

from typing import Any

from shared.trainer_state import (
    BatchSplit,
    Best,
    EarlyStoppingState,
    GradSpikeState,
    RngScheme,
    TrainerState,
)


def trainer_state(step: int, total: int = 100, **changes: Any) -> TrainerState:
    values: dict[str, Any] = {
        "step": step, "total_steps": total, "data_position": step,
        "rng": RngScheme("seed(seed*1000003 + step*1009 + micro_batch)", 0),
        "early_stopping": EarlyStoppingState(None, -1, 0),
        "grad_spike": GradSpikeState((), 0, -1), "best": Best(None, -1),
        "batch": BatchSplit(4, 1, 4), "config_hash": "abc", "versions": {}, "lr_scale": 1.0,
        "loss_history": (), "reason": "periodic",
    }
    values.update(changes)
    return TrainerState(**values)
