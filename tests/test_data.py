"""worker/data.py and worker/batching.py: formats, malformed lines, weights, batches."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from shared import config as cfg
from shared.errors import DataError
from worker import data
from worker.batching import EpochPlan, collate, fixed_subset, micro_batches


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model)


def _config(**training) -> cfg.Config:
    return cfg.resolve({"model": "m", "data": "d", "training": training})


def _write(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


@pytest.mark.parametrize(
    "record",
    [
        {"text": "the fox jumps"},
        {"prompt": "the fox", "completion": "jumps"},
        {"messages": [{"role": "user", "content": "the fox"},
                      {"role": "assistant", "content": "jumps"}]},
    ],
    ids=["text", "completions", "chat"],
)
def test_each_mlx_lm_format_tokenises(tmp_path: Path, tokenizer, record: dict) -> None:
    path = _write(tmp_path / "train.jsonl", [record] * 3)
    ex = data.load_split(path, tokenizer, _config(), 0.0)
    tokens, offset, weight = ex.get(0)
    assert len(tokens) > 2 and offset == 0 and weight == 1.0
    assert tokens[-1] == tokenizer.eos_token_id


def test_malformed_lines_are_skipped_counted_and_named(tmp_path: Path, tokenizer) -> None:
    lines = [{"text": f"good {i}"} for i in range(8)]
    lines[2] = "{not json"
    lines[5] = {"txt": "wrong key"}
    lines.insert(7, "")
    lines.append({"text": "x", "auth_weight": 1.5})
    path = _write(tmp_path / "train.jsonl", lines)
    index = data.scan(path, _config())
    assert index.report.malformed == 3 and index.report.blank == 1 and len(index) == 6
    assert index.report.examples[0].startswith("line 3: invalid JSON")
    assert index.report.examples[1].startswith("line 6: expected a 'text'")
    assert "line 10: auth_weight must be a number in [0, 0.99]" in index.report.examples[2]


def test_a_mostly_malformed_file_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl", ["{bad"] * 6 + [{"text": "ok"}] * 4)
    with pytest.raises(DataError, match=r"train.jsonl: 6 of 10 lines are malformed"):
        data.scan(path, _config())


def test_mixed_formats_count_as_malformed(tmp_path: Path) -> None:
    path = _write(tmp_path / "train.jsonl",
                  [{"text": "a b"}] * 3 + [{"prompt": "a", "completion": "b"}])
    index = data.scan(path, _config())
    assert index.report.malformed == 1 and "expected text format" in index.report.examples[0]


def test_distrust_weights_follow_the_documented_formula(tmp_path: Path, tokenizer) -> None:
    rows = [(0.0, 0.0), (0.9, 0.0), (0.0, 2.0), (0.5, 1.0), (0.99, 0.3)]
    path = _write(tmp_path / "train.jsonl", [
        {"text": f"row {i}", "auth_weight": a, "prov_entropy": e} for i, (a, e) in enumerate(rows)
    ])
    ex = data.load_split(path, tokenizer, _config(), lambda_weight=0.5)
    d = np.array([2.7 * (math.log(1 - a + 1e-8) + e) ** 2 for a, e in rows])
    expected = 1 + 0.5 * d / d.mean()
    np.testing.assert_allclose(ex.weights, expected, rtol=1e-6)
    # Low authority alone, or high provenance entropy alone, pulls harder than a trusted source.
    assert ex.weights[1] > ex.weights[0] and ex.weights[2] > ex.weights[0]
    plain = data.load_split(path, tokenizer, _config(), lambda_weight=0.0)
    assert np.all(plain.weights == 1.0)


def test_streaming_gives_the_same_examples_as_in_memory(tmp_path: Path, tokenizer,
                                                        corpus: Path) -> None:
    path = corpus / "train.jsonl"
    mem = data.load_split(path, tokenizer, _config(streaming="false"), 0.0)
    stream = data.load_split(path, tokenizer, _config(streaming="true"), 0.0)
    assert stream.streaming and not mem.streaming
    for i in (0, 17, len(mem) - 1):
        assert mem.get(i) == stream.get(i)


def test_val_jsonl_is_accepted_as_validation_file(tmp_path: Path) -> None:
    (tmp_path / "val.jsonl").write_text('{"text": "x"}\n')
    assert data.find_valid_file(tmp_path) == tmp_path / "val.jsonl"
    (tmp_path / "valid.jsonl").write_text('{"text": "x"}\n')
    assert data.find_valid_file(tmp_path) == tmp_path / "valid.jsonl"


def test_batches_do_not_depend_on_the_micro_batch_size() -> None:
    lengths = np.random.default_rng(0).integers(5, 50, size=103)
    plan = EpochPlan(lengths, effective_batch=8, seed=3)
    assert plan.groups_per_epoch == 12
    for position in (0, 5, 11, 12, 40):
        group = plan.group(position)
        assert len(group) == 8
        for b in (1, 2, 4, 8):
            assert np.array_equal(np.concatenate(list(micro_batches(group, b))), group)


def test_epochs_are_shuffled_deterministically() -> None:
    lengths = np.arange(64)
    a, b = EpochPlan(lengths, 4, seed=1), EpochPlan(lengths, 4, seed=1)
    epoch0 = [tuple(a.group(p)) for p in range(16)]
    epoch1 = [tuple(a.group(p)) for p in range(16, 32)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # same groups, new order
    assert [tuple(b.group(p)) for p in range(16, 32)] == epoch1  # random access, same result
    assert [tuple(EpochPlan(lengths, 4, seed=2).group(p)) for p in range(16)] != epoch0


def test_too_small_a_dataset_is_an_error() -> None:
    with pytest.raises(DataError, match="fewer than one effective batch"):
        EpochPlan(np.arange(3), effective_batch=4, seed=0)


def test_collate_pads_like_mlx_lm_and_records_spans() -> None:
    mb = collate([([5, 6, 7], 1, 1.0), ([5] * 40, 0, 2.0)], max_seq_length=2048)
    assert mb.tokens.shape == (2, 65)  # 1 + next multiple of 32
    assert mb.spans.tolist() == [[1, 3], [0, 40]]
    assert mb.weights.tolist() == [1.0, 2.0] and mb.n_truncated == 0
    cut = collate([([1] * 100, 0, 1.0)], max_seq_length=50)
    assert cut.tokens.shape == (1, 50) and cut.n_truncated == 1


def test_validation_subset_is_fixed() -> None:
    a = fixed_subset(100, 10, seed=0)
    assert np.array_equal(a, fixed_subset(100, 10, seed=0)) and len(set(a)) == 10
    assert len(fixed_subset(5, 10, seed=0)) == 5
