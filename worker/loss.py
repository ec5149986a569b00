"""The training loss: example-weighted token cross-entropy, padding and prompts masked.

Returns sums, not means, so that gradient accumulation over micro-batches divides once by
the total weight of the whole effective batch — the same math as one big batch.
"""

from __future__ import annotations

from typing import Any


def weighted_ce_sums(model: Any, tokens: Any, spans: Any, weights: Any) -> tuple[Any, Any]:
    """(sum_i w_i * sum_t ce_it, (sum_i w_i * n_i, sum_i n_i)) over unmasked targets.

    `spans[:, 0]` is the prompt offset (targets before it are masked when mask_prompt is on)
    and `spans[:, 1]` the sequence length: target t predicts token t+1, so only t+1 < length
    counts — padding never does. (mlx_lm's default_loss uses <= and trains every sequence
    to predict one padding token after EOS.)
    """
    import mlx.core as mx
    import mlx.nn as nn

    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(inputs)
    pos = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(pos >= spans[:, 0:1], pos < spans[:, 1:])
    ce = nn.losses.cross_entropy(logits, targets).astype(mx.float32) * mask
    w = weights[:, None]
    return (ce * w).sum(), ((mask * w).sum(), mask.sum())


def token_mean(total: Any, weight: Any) -> Any:
    """total / weight, and 0 where weight is 0: a batch with no target tokens (every prompt
    masked, or cut away by max_seq_length) has total 0 and must not give 0/0 = NaN, which
    the supervisor would take for divergence. The gradient of such a batch is 0 as well."""
    import mlx.core as mx

    return total / mx.where(weight > 0, weight, mx.ones_like(weight))
