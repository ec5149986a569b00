"""The yardstick: the barest compiled MLX LoRA loop this machine can run.

    python -m benchmarks.bare_loop OUT.json --model DIR --data DIR --iters 129 \
        --batch-size 4 --num-layers -1 --rank 8 --scale 20

Nothing but what a LoRA step needs: the model loaded with `mlx_lm.load`, frozen, and
`linear_to_lora_layers` on the same layers and rank as the tools it is compared with
(mlx_lm's own function, mlx_lm/tuner/utils.py); Adam; one `mx.compile`d step doing
value-and-grad of the token-mean cross-entropy plus the optimizer update (the shape of
mlx_lm's `trainer.train` step, mlx_lm/tuner/trainer.py, without accumulation or clipping);
batches tokenised once up front (mlx_lm's TextDataset rule: `encode(text)` plus EOS) and
padded to the same width the tools use (1 + a multiple of 32, at most max_seq_length), so
on a fixed-shape corpus every batch has one shape; one `mx.eval` a step. No data loader, no
logging, no checks: whatever a tool spends beyond this is its own per-step cost.

OUT.json gets `step_times` (time.time() after each step's `mx.eval`, the same clock point
as benchmarks/mlxlm_timed.py), `losses` (every step's loss, host floats read after the
timing) and `peak_mb` (MLX's peak allocator memory).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

PAD_TO = 32  # mlx_lm's iterate_batches pads to 1 + a multiple of 32


def batches(tokenizer: Any, path: Path, batch_size: int, max_seq_length: int) -> list[Any]:
    """int32 [batch_size, width] arrays and int32 [batch_size] lengths, file order, the
    leftover dropped (mlx_lm's iterate_batches keeps full batches only)."""
    import mlx.core as mx
    import numpy as np

    seqs = []
    for line in path.read_text().splitlines():
        if line.strip():
            t = tokenizer.encode(json.loads(line)["text"])
            if t[-1] != tokenizer.eos_token_id:
                t.append(tokenizer.eos_token_id)
            seqs.append(t[:max_seq_length])
    out = []
    for i in range(0, len(seqs) - batch_size + 1, batch_size):
        group = seqs[i:i + batch_size]
        longest = max(len(s) for s in group)
        width = min(1 + PAD_TO * ((longest + PAD_TO - 1) // PAD_TO), max_seq_length)
        arr = np.zeros((batch_size, width), np.int32)
        for j, s in enumerate(group):
            arr[j, :len(s)] = s
        out.append((mx.array(arr), mx.array([len(s) for s in group], mx.int32)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", type=Path, required=True, help="a folder with train.jsonl")
    ap.add_argument("--iters", type=int, required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--num-layers", type=int, default=-1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--scale", type=float, default=20.0)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--max-seq-length", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(a.seed)
    model, tokenizer = load(a.model)
    model.freeze()
    layers = len(model.layers) if a.num_layers == -1 else a.num_layers
    linear_to_lora_layers(model, layers, {"rank": a.rank, "scale": a.scale, "dropout": 0.0})
    optimizer = optim.Adam(learning_rate=a.learning_rate)
    data = batches(tokenizer, a.data / "train.jsonl", a.batch_size, a.max_seq_length)

    def loss_fn(model: Any, tokens: Any, lengths: Any) -> Any:
        """Token-mean cross-entropy over the real targets (target t predicts token t+1)."""
        logits = model(tokens[:, :-1])
        mask = mx.arange(1, tokens.shape[1]) < lengths[:, None]
        ce = nn.losses.cross_entropy(logits, tokens[:, 1:]) * mask
        return ce.sum() / mask.sum()

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(tokens: Any, lengths: Any) -> Any:
        loss, grads = loss_and_grad(model, tokens, lengths)
        optimizer.update(model, grads)
        return loss

    model.train()
    times: list[float] = []
    losses = []
    for it in range(a.iters):
        loss = step(*data[it % len(data)])
        mx.eval(state, loss)  # the one sync point of a step
        times.append(time.time())
        losses.append(loss)
    a.out.write_text(json.dumps({
        "step_times": times, "losses": [float(x.item()) for x in losses],
        "peak_mb": mx.get_peak_memory() / 2**20,
        "batch_shapes": [list(t.shape) for t, _ in data],
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
