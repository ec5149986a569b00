"""Deterministic batches whose content does not depend on the micro-batch size.

The data position is one integer: how many effective batches (optimizer steps' worth of
examples) have been consumed. Position p is slot `p % groups_per_epoch` of epoch
`p // groups_per_epoch`:

- examples are sorted by length once (stable) and cut into groups of `effective_batch`
  consecutive examples, so each group holds similar lengths and pads little (mlx_lm's idea);
- each epoch visits the groups in an order drawn from `numpy.random.default_rng([seed, epoch])`;
- a group is split into micro-batches of `batch_size` for gradient accumulation.

So a checkpoint needs only the position to continue with the exact next batch, and halving
the micro-batch (doubling accumulation) after an OOM trains on exactly the same examples.

**Every example, every epoch.** When `batch_size x grad_accumulation_steps` does not divide
the number of examples, the last group is smaller: 60 examples with an effective batch of
32 are two groups, of 32 and 28 examples, and both are trained on in every epoch. Because the
groups are cut from the length-sorted order, the short group holds the longest examples.
It is one optimizer step like any other: its loss is the weighted mean over its own target
tokens (worker/loss.py), so its gradient is weighted by its tokens, not by the number of
examples it lacks. `mlx_lm lora` differs on purpose here: its `iterate_batches` builds only
`len(dataset) // batch_size` full batches and never trains on the leftover — the longest
examples, since it sorts by length too.

**An effective batch larger than the data** (batch 4 x accumulation 16 on 60 examples) is
the same rule with no full group: one group of all 60 examples, one optimizer step per
epoch. `mlx_lm lora` runs such a config too: its `iterate_batches` only needs `batch_size`
examples, and with `loop=True` an optimizer step's 16 micro-batches run on into the next
epoch's order, so its step sees 64 examples, some twice. Here a step sees each example
once; the worker says so at start (`check_size`). Fewer examples than `batch_size` is
refused, as mlx_lm refuses it ("Dataset must have at least batch_size=4 examples").

**Older checkpoints.** Checkpoints written before this rule (no `plan` in their
trainer_state.json) used `groups_per_epoch = n // effective_batch` and dropped the leftover.
Resuming one with the new plan would silently change which batch comes next, so
`plan_for_resume` keeps the old plan (`leftover="drop"`) for such a run and says so; a run
started afresh uses the new one. A plan that differs from the checkpoint's for any other
reason (the data, the streaming setting, the tokenizer) is reported the same way.

**Skipped batches.** A batch the supervisor found to be a data problem (a non-finite loss on
the same batch twice, supervisor/policy.py) is skipped in every epoch: `batch_id(position)`
names the group a position visits, the same group in every epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from shared.errors import DataError
from shared.trainer_state import TrainerState

PAD_TO = 32

Leftover = Literal["short_group", "drop"]


@dataclass(frozen=True)
class MicroBatch:
    tokens: np.ndarray  # int32 [b, T]
    spans: np.ndarray  # int32 [b, 2]: (prompt offset, length)
    weights: np.ndarray  # float32 [b]
    n_truncated: int


class EpochPlan:
    """Which examples form the effective batch at each data position.

    lengths: int64 [n] (token counts, or byte counts as a proxy when streaming);
    leftover: "short_group" (the rule above) or "drop" (the plan of older checkpoints).
    Raises DataError when there is no example, or (the old plan) no full group.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        effective_batch: int,
        seed: int,
        leftover: Leftover = "short_group",
    ):
        n = len(lengths)
        if n == 0:
            raise DataError("training set has no examples")
        if leftover == "drop" and n < effective_batch:  # older checkpoints: never the case
            raise DataError(
                f"training set has {n} examples, fewer than one effective batch "
                f"(batch_size x grad_accumulation_steps = {effective_batch})"
            )
        self.order = np.argsort(lengths, kind="stable").astype(np.int64)
        self.examples = n
        self.effective_batch = effective_batch
        self.leftover: Leftover = leftover
        full = n // effective_batch
        self.groups_per_epoch = full if leftover == "drop" or n % effective_batch == 0 else full + 1
        self.seed = seed
        self._epoch = -1
        self._perm = np.arange(self.groups_per_epoch)

    @property
    def dropped(self) -> int:
        """Examples never trained on (only the old "drop" plan has any)."""
        return self.examples - min(self.examples, self.groups_per_epoch * self.effective_batch)

    def batch_id(self, position: int) -> int:
        """The group visited at this data position: the same group in every epoch."""
        epoch, k = divmod(position, self.groups_per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(
                self.groups_per_epoch
            )
            self._epoch = epoch
        return int(self._perm[k])

    def members(self, batch: int) -> np.ndarray:
        """Example indices of group `batch` (int64; the last group may be shorter)."""
        e = self.effective_batch
        return self.order[batch * e : min((batch + 1) * e, self.examples)]

    @property
    def groups(self) -> list[np.ndarray]:
        """Every group's example indices, by group number."""
        return [self.members(b) for b in range(self.groups_per_epoch)]

    def group(self, position: int) -> np.ndarray:
        """Example indices of the effective batch at this data position."""
        return self.members(self.batch_id(position))

    def epoch(self, position: int) -> int:
        return position // self.groups_per_epoch

    def fingerprint(self) -> str:
        """Identity of the groups (not of their order, which follows from the seed)."""
        h = hashlib.sha256(f"{self.effective_batch}:{self.leftover}:".encode())
        h.update(self.order.astype("<i8").tobytes())
        return h.hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """Stored in trainer_state.json as "plan" (see plan_for_resume)."""
        return {
            "leftover": self.leftover,
            "groups_per_epoch": self.groups_per_epoch,
            "examples": self.examples,
            "effective_batch": self.effective_batch,
            "fingerprint": self.fingerprint(),
        }


def plan_for_resume(
    lengths: np.ndarray, effective_batch: int, seed: int, stored: TrainerState | None
) -> tuple[EpochPlan, str]:
    """The plan a run continues with, and a warning ("" when none is due).

    `stored` is the checkpoint's trainer state (None for a fresh start). Without a "plan"
    entry it was written by the old rule: when that rule differs from the new one for this
    data (the effective batch does not divide it), the old plan is kept so the batches after
    the resume point are the ones an uninterrupted run would have trained on.
    """
    plan = EpochPlan(lengths, effective_batch, seed)
    if stored is None:
        return plan, ""
    info = stored.plan
    if info is None:
        old = EpochPlan(lengths, effective_batch, seed, leftover="drop")
        before = stored.groups_per_epoch
        if old.groups_per_epoch == plan.groups_per_epoch:
            return plan, ""  # the effective batch divides the data: both rules agree
        if before == old.groups_per_epoch:
            return old, (
                f"this run's checkpoint was written by an older version that never trains on "
                f"the {old.dropped} longest of {old.examples} examples (the effective batch "
                f"{effective_batch} does not divide them); the run continues with that plan "
                "so the data order is unchanged; start it again with --fresh to train on "
                "every example"
            )
        return plan, (
            f"the training set now gives {plan.groups_per_epoch} batches per epoch, the "
            f"checkpoint's run had {before}: the batches after the resume point differ from "
            "those of an uninterrupted run"
        )
    if info.leftover == "drop":  # shared/trainer_state.py checked it is one of the two
        plan = EpochPlan(lengths, effective_batch, seed, leftover="drop")
    if info.fingerprint != plan.fingerprint():
        return plan, (
            f"the training batches differ from those of the checkpoint's run ({plan.examples} "
            f"examples now, {info.examples} then; the data, the streaming setting or "
            "the tokenizer changed): the batches after the resume point differ from those of "
            "an uninterrupted run"
        )
    return plan, ""


def check_size(examples: int, batch_size: int, effective_batch: int, path: Any) -> str:
    """The training set's size against the batch: DataError for fewer examples than
    `batch_size` (mlx_lm's `iterate_batches` refuses that too); a warning to show when the
    effective batch is larger than the data (each step is then the whole set, see above);
    "" otherwise."""
    if examples < batch_size:
        raise DataError(
            f"{path}: {examples} usable example(s), fewer than batch_size {batch_size} "
            "(mlx_lm lora refuses this too: \"Dataset must have at least batch_size "
            "examples\"); lower batch_size or add examples"
        )
    if examples < effective_batch:
        return (
            f"the effective batch (batch_size x grad_accumulation_steps = {effective_batch}) "
            f"is larger than the {examples} training examples of {path}: each optimizer step "
            f"trains on all {examples} once (one step per epoch; mlx_lm lora fills a step "
            "with micro-batches of the next epoch, some examples twice)"
        )
    return ""


def target_count(n_tokens: int, offset: int, max_seq_length: int) -> int:
    """Tokens an example contributes to the loss: targets t with max(1, offset) <= t < length,
    length = min(n_tokens, max_seq_length) (the mask of worker/loss.py)."""
    return max(0, min(n_tokens, max_seq_length) - max(offset, 1))


def collate(examples: list[tuple[list[int], int, float]], max_seq_length: int) -> MicroBatch:
    """Pad like mlx_lm: to 1 + a multiple of 32 (few distinct shapes to compile)."""
    lengths = [len(t) for t, _, _ in examples]
    longest = max(lengths)
    width = min(1 + PAD_TO * ((longest + PAD_TO - 1) // PAD_TO), max_seq_length)
    arr = np.zeros((len(examples), width), np.int32)
    spans = np.zeros((len(examples), 2), np.int32)
    truncated = 0
    for j, (tokens, offset, _) in enumerate(examples):
        n = min(len(tokens), max_seq_length)
        truncated += n < len(tokens)
        arr[j, :n] = tokens[:n]
        spans[j] = (offset, n)
    weights = np.array([w for _, _, w in examples], np.float32)
    return MicroBatch(arr, spans, weights, truncated)


def micro_batches(indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(indices), batch_size):
        yield indices[i : i + batch_size]


def fixed_subset(n: int, size: int, seed: int) -> np.ndarray:
    """The validation subset: the same examples on every evaluation and every restart."""
    if size < 0 or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 7919]).permutation(n)[:size])
