"""Run mlx-lm-lora's training CLI with a wall-clock stamp after every training step.

    <peer venv>/bin/python -m benchmarks.peer_timed OUT.json --config sft.yaml
                                              # = mlx_lm_lora.train --config sft.yaml

Runs in the peer's own venv (benchmarks/peer.py), so it imports nothing of this project.
Training is mlx-lm-lora's own code path, unchanged: its SFT loop (mlx_lm_lora/trainer/
sft_trainer.py, 5.10) iterates `tqdm(range(1, iters + 1))` once per step and ends each
step's body with `mx.eval(state, ...)`; the tqdm it uses is replaced by one whose iterator
stamps `time.time()` each time the loop asks for the next step, i.e. at the end of the
previous step's body (its report block included, as in benchmarks/mlxlm_timed.py). At exit
the stamps (the first, taken before step 1, dropped) and MLX's peak memory go to OUT.json.

One shim, off macOS only: `train_sft` starts with
`mx.set_wired_limit(mx.device_info()["max_recommended_working_set_size"])`, a Metal-only key
(KeyError on MLX's CPU build, where wiring memory means nothing). `device_info()` is given
that key (the machine's memory) when it lacks it; nothing else changes.
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
    from mlx_lm_lora import train
    from mlx_lm_lora.trainer import sft_trainer

    info = mx.device_info()
    if "max_recommended_working_set_size" not in info:
        import os

        fixed = {**info, "max_recommended_working_set_size":
                 os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}
        mx.device_info = lambda: fixed

    stamps: list[float] = []
    base = sft_trainer.tqdm

    class TimedTqdm(base):  # type: ignore[misc, valid-type]
        def __iter__(self) -> Any:
            for item in super().__iter__():
                stamps.append(time.time())
                yield item
            stamps.append(time.time())

    sft_trainer.tqdm = TimedTqdm

    def dump() -> None:
        with open(out, "w") as f:
            json.dump({"step_times": stamps[1:], "peak_mb": mx.get_peak_memory() / 2**20}, f)

    atexit.register(dump)
    train.main()


if __name__ == "__main__":
    main()
