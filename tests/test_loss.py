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
