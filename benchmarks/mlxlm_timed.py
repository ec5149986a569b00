"""Run plain `mlx_lm lora` with a wall-clock timestamp after every training step.

    python -m benchmarks.mlxlm_timed OUT.json -c lora.yaml      # = mlx_lm lora -c lora.yaml

Training is mlx_lm's own code path, unchanged: the only additions are that `TrainUI.advance`
(called once per iteration, right after the step's `mx.eval`) also appends `time.time()` to
a list, `TrainUI.report_train` records what mlx_lm itself reports, and the training batch
iterator (the default argument of `trainer.train`) is wrapped to record each batch's shape.
At exit these, and MLX's peak memory, are written to OUT.json for the benchmark harness.
"""

from __future__ import annotations

import atexit
import json
import sys
import time
from typing import Any


def main() -> None:
    out, sys.argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
    import mlx.core as mx
    from mlx_lm import cli_ui, lora
    from mlx_lm.tuner import trainer

    record: dict[str, Any] = {"step_times": [], "reports": [], "batch_shapes": []}
    advance, report_train = cli_ui.TrainUI.advance, cli_ui.TrainUI.report_train

    def timed_advance(self: Any) -> None:
        record["step_times"].append(time.time())
        advance(self)

    def recorded_report(self: Any, it: int, loss: float, tok_s: float, tokens: int) -> None:
        record["reports"].append({"iteration": it, "train_loss": loss,
                                  "tokens_per_sec": tok_s, "trained_tokens": tokens})
        report_train(self, it, loss, tok_s, tokens)

    iterate = trainer.iterate_batches

    def recorded_batches(*args: Any, **kwargs: Any) -> Any:
        for batch in iterate(*args, **kwargs):
            if kwargs.get("loop"):  # training, not evaluation
                record["batch_shapes"].append(list(batch[0].shape))
            yield batch

    defaults = list(trainer.train.__defaults__ or ())
    if iterate in defaults:
        defaults[defaults.index(iterate)] = recorded_batches
        trainer.train.__defaults__ = tuple(defaults)
    cli_ui.TrainUI.advance = timed_advance  # type: ignore[method-assign]
    cli_ui.TrainUI.report_train = recorded_report  # type: ignore[method-assign]

    def dump() -> None:
        record["peak_mb"] = mx.get_peak_memory() / 2**20
        with open(out, "w") as f:
            json.dump(record, f)

    atexit.register(dump)
    lora.main()


if __name__ == "__main__":
    main()
