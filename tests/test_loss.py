"""worker/loss.py: padding and masked prompts never count; weights scale per example."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from worker.loss import weighted_ce_sums


@pytest.fixture(scope="module")
def model(tiny_model: Path):
    from mlx_lm.utils import load

    m, _ = load(str(tiny_model))
    return m


def _sums(model, rows: list[list[int]], width: int, spans, weights):
    tokens = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    wce, (wtok, ntok) = weighted_ce_sums(model, mx.array(tokens), mx.array(np.array(spans)),
                                         mx.array(np.array(weights, np.float32)))
    return wce.item(), wtok.item(), ntok.item()


def test_padding_never_counts(model) -> None:
    row = [1, 50, 60, 70, 80, 2]
    narrow = _sums(model, [row], 6, [[0, 6]], [1.0])
    wide = _sums(model, [row], 40, [[0, 6]], [1.0])
    assert narrow[2] == wide[2] == 5  # 6 tokens: 5 next-token targets, none of them padding
    assert narrow[0] == pytest.approx(wide[0], rel=1e-5)


def test_masked_prompt_tokens_do_not_count(model) -> None:
    row = [1, 50, 60, 70, 80, 2]
    full = _sums(model, [row], 8, [[0, 6]], [1.0])
    masked = _sums(model, [row], 8, [[3, 6]], [1.0])
    assert masked[2] == 3  # only targets at positions 3, 4, 5
    assert masked[0] < full[0]


def test_weights_scale_each_examples_share(model) -> None:
    rows = [[1, 50, 60, 2], [1, 70, 80, 90, 2]]
    plain = _sums(model, rows, 8, [[0, 4], [0, 5]], [1.0, 1.0])
    heavy = _sums(model, rows, 8, [[0, 4], [0, 5]], [1.0, 3.0])
    alone = _sums(model, [rows[1]], 8, [[0, 5]], [1.0])
    assert heavy[0] == pytest.approx(plain[0] + 2 * alone[0], rel=1e-5)
    assert heavy[1] == plain[1] + 2 * 4 and heavy[2] == plain[2] == 7


def test_a_batch_without_target_tokens_gives_loss_zero_and_zero_gradients_not_nan(model):
    """mask_prompt with a prompt that fills max_seq_length: every target is masked. The step
    math (sums, then one division by the batch's weight) must not make 0/0 = NaN, which the
    supervisor would take for divergence."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from worker.loss import token_mean

    tokens = mx.array(np.array([[1, 50, 60, 70, 80, 2], [1, 70, 80, 90, 2, 0]], np.int32))
    spans = mx.array(np.array([[6, 6], [5, 5]], np.int32))  # prompt offset = length
    weights = mx.array(np.array([1.0, 2.0], np.float32))

    def loss(m, t, s, w):
        wce, (wtok, _) = weighted_ce_sums(m, t, s, w)
        return token_mean(wce, wtok)

    value, grads = nn.value_and_grad(model, loss)(model, tokens, spans, weights)
    assert value.item() == 0.0
    assert all(np.all(np.array(g) == 0.0) for _, g in tree_flatten(grads))
    assert token_mean(mx.array(3.0), mx.array(2.0)).item() == 1.5  # the normal case is a mean
