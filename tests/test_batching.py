"""worker/batching.py: the epoch plan (every example every epoch, exact resume, old
checkpoints), micro-batches, padding, the validation subset."""

from __future__ import annotations

import numpy as np
import pytest

from shared.errors import DataError
from shared.trainer_state import PlanState
from tests.checkpoint_support import trainer_state
from worker.batching import (
    EpochPlan,
    check_size,
    collate,
    fixed_subset,
    micro_batches,
    plan_for_resume,
    target_count,
)


def _old_plan_group(lengths: np.ndarray, effective: int, seed: int, position: int) -> np.ndarray:
    """The plan of checkpoints written before the short group, written out independently:
    n // effective full groups of the length-sorted order, the leftover never used, each
    epoch's order from default_rng([seed, epoch])."""
    order = np.argsort(lengths, kind="stable")
    g = len(lengths) // effective
    groups = order[: g * effective].reshape(g, effective)
    epoch, k = divmod(position, g)
    return groups[np.random.default_rng([seed, epoch]).permutation(g)[k]]


def test_every_example_is_trained_on_every_epoch_when_the_batch_does_not_divide() -> None:
    # The example: 60 examples, batch 4 x accumulation 8 = 32. Before: one group per
    # epoch, and the 28 longest examples were never seen.
    lengths = np.random.default_rng(5).permutation(np.arange(100, 160))
    plan = EpochPlan(lengths, effective_batch=32, seed=0)
    assert plan.groups_per_epoch == 2 and plan.dropped == 0
    for epoch in range(3):
        seen = np.concatenate([plan.group(epoch * 2 + k) for k in range(2)])
        assert sorted(seen.tolist()) == list(range(60)), epoch  # each example exactly once
    sizes = sorted(len(plan.members(b)) for b in range(2))
    assert sizes == [28, 32]
    short = next(plan.members(b) for b in range(2) if len(plan.members(b)) == 28)
    assert sorted(lengths[short].tolist()) == list(range(132, 160))  # the 28 longest


def test_a_smaller_micro_batch_trains_on_exactly_the_same_examples() -> None:
    lengths = np.random.default_rng(0).integers(5, 50, size=103)
    plan = EpochPlan(lengths, effective_batch=8, seed=3)
    assert plan.groups_per_epoch == 13  # 12 full groups and one of 7
    sizes = [len(plan.group(p)) for p in range(13)]
    assert sorted(sizes) == [7] + [8] * 12
    for position in range(40):
        group = plan.group(position)
        for b in (1, 2, 3, 4, 8):
            parts = list(micro_batches(group, b))
            assert np.array_equal(np.concatenate(parts), group)
            assert all(len(x) <= b for x in parts)


def test_positions_are_random_access_and_the_same_batch_every_epoch() -> None:
    lengths = np.arange(64)
    a, b = EpochPlan(lengths, 4, seed=1), EpochPlan(lengths, 4, seed=1)
    epoch0 = [tuple(a.group(p)) for p in range(16)]
    epoch1 = [tuple(a.group(p)) for p in range(16, 32)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # same groups, new order
    assert [tuple(b.group(p)) for p in range(16, 32)] == epoch1  # random access, same result
    assert [tuple(EpochPlan(lengths, 4, seed=2).group(p)) for p in range(16)] != epoch0
    for p in range(40):  # batch_id names the group: the same examples whatever the epoch
        assert np.array_equal(a.members(a.batch_id(p)), a.group(p))


def test_an_effective_batch_larger_than_the_data_is_one_group_per_epoch() -> None:
    # mlx_lm lora runs such a config (worker/batching.py); each step is then the whole set
    plan = EpochPlan(np.arange(3), effective_batch=4, seed=0)
    assert plan.groups_per_epoch == 1
    assert [list(plan.group(p)) for p in range(3)] == [[0, 1, 2]] * 3
    assert check_size(3, 2, 4, "train.jsonl").startswith(
        "the effective batch (batch_size x grad_accumulation_steps = 4) is larger than the "
        "3 training examples of train.jsonl")
    assert check_size(8, 2, 4, "train.jsonl") == ""
    with pytest.raises(DataError, match="1 usable example"):  # fewer than batch_size
        check_size(1, 2, 4, "train.jsonl")
    with pytest.raises(DataError, match="training set has no examples"):
        EpochPlan(np.arange(0), effective_batch=4, seed=0)


def test_a_checkpoint_of_the_old_plan_resumes_with_the_old_plan_and_says_so() -> None:
    lengths = np.random.default_rng(0).integers(5, 50, size=103)
    old_state = trainer_state(30, groups_per_epoch=12)  # no "plan"
    plan, note = plan_for_resume(lengths, 8, 3, old_state)
    assert plan.groups_per_epoch == 12 and plan.leftover == "drop"
    assert "7 longest of 103 examples" in note and "--fresh" in note
    for position in range(60):  # the data after the resume point is what it would have been
        assert np.array_equal(plan.group(position), _old_plan_group(lengths, 8, 3, position))
    assert plan.to_dict()["leftover"] == "drop"  # and the next checkpoint says so


def test_an_old_checkpoint_of_data_the_batch_divides_needs_no_change() -> None:
    lengths = np.arange(64)
    plan, note = plan_for_resume(lengths, 8, 0, trainer_state(3, groups_per_epoch=8))
    assert note == "" and plan.leftover == "short_group" and plan.groups_per_epoch == 8


def test_a_different_plan_than_the_checkpoints_is_reported() -> None:
    lengths = np.random.default_rng(0).integers(5, 50, size=103)
    stored = trainer_state(5, plan=PlanState(**EpochPlan(lengths, 8, 3).to_dict()))
    assert plan_for_resume(lengths, 8, 3, stored)[1] == ""
    other = lengths.copy()
    other[[0, 1]] = other[[1, 0]] + 100  # e.g. byte lengths (streaming) instead of tokens
    _, note = plan_for_resume(other, 8, 3, stored)
    assert "batches after the resume point differ" in note
    old = trainer_state(5, groups_per_epoch=11)  # an old run on other data
    assert "now gives 13 batches per epoch" in plan_for_resume(lengths, 8, 3, old)[1]
    assert plan_for_resume(lengths, 8, 3, None)[1] == ""


def test_target_count_is_the_loss_mask() -> None:
    # targets t with max(1, offset) <= t < min(length, max_seq_length)
    assert target_count(10, 0, 2048) == 9
    assert target_count(10, 4, 2048) == 6
    assert target_count(10, 4, 6) == 2
    assert target_count(10, 6, 6) == 0  # the prompt fills max_seq_length
    assert target_count(1, 0, 2048) == 0


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
