"""The COMPLETE marker of a run directory: what it holds, and what a later start is told.

worker/finish.py writes RUN_DIR/COMPLETE (JSON, atomically) when a run finishes or early-stops:

    {"status": "completed" | "early_stopped", "step": 1000, "total_steps": 1000,
     "final_checkpoint": ".../checkpoints/step-0001000", "adapters": ".../adapters",
     "best_step": 800, "best_val_loss": 1.23, "time": 1796072582.7}

A complete run is never trained again in place: `overnight train` and `overnight run` say so
and exit 0. When the config now asks for more steps than the run finished (`iters` raised
after the night), that is said too, with the two ways on: a new run directory that starts
from the finished adapters (mlx_lm's `resume_adapter_file`), or `--fresh`. The finished run
is not extended in place because what it trained with was planned for its `iters` (the
learning-rate schedule's decay, the data order's epochs), so a longer run would silently
differ from one started with the larger `iters`.
"""

from __future__ import annotations

import contextlib
from typing import Any

from shared import strictjson
from shared.layout import RunDir


def read_marker(run: RunDir) -> dict[str, Any] | None:
    """COMPLETE's fields; {} when it exists but cannot be read or is not a JSON object; None
    when the run is not complete."""
    with contextlib.suppress(OSError, ValueError):
        data = strictjson.loads(run.complete_marker.read_bytes())
        return data if isinstance(data, dict) else {}
    return {} if run.complete_marker.exists() else None


def more_iters_asked(marker: dict[str, Any], iters: int, run: RunDir) -> str:
    """"" unless the run finished all its steps (status "completed") and `iters` (steps, from
    the config of this start) is more than it had: then the sentence that says what to do."""
    total = marker.get("total_steps")
    if (marker.get("status") != "completed" or not isinstance(total, int)
            or isinstance(total, bool) or iters <= total):
        return ""
    return (f"the config now asks for iters: {iters}, the run finished its {total}; a finished "
            "run is not extended in place (its learning-rate schedule and data order were for "
            f"{total} steps): to train on, start a new run directory with "
            f"resume_adapter_file: {run.adapters}, or add --fresh to start this one over")
