"""Deterministic batches whose content does not depend on the micro-batch size.

The data position is one integer: how many effective batches (optimizer steps' worth of
examples) have been consumed. Position p is batch `p % groups_per_epoch` of epoch
`p // groups_per_epoch`:

- examples are sorted by length once (stable) and cut into groups of `effective_batch`
  consecutive examples, so each group holds similar lengths and pads little (mlx_lm's idea);
- each epoch visits the groups in an order drawn from `numpy.random.default_rng([seed, epoch])`;
- a group is split into micro-batches of `batch_size` for gradient accumulation.

So a checkpoint needs only the position to continue with the exact next batch, and halving
the micro-batch (doubling accumulation) after an OOM trains on exactly the same examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from shared.errors import DataError

PAD_TO = 32


@dataclass(frozen=True)
class MicroBatch:
    tokens: np.ndarray  # int32 [b, T]
    spans: np.ndarray  # int32 [b, 2]: (prompt offset, length)
    weights: np.ndarray  # float32 [b]
    n_truncated: int


class EpochPlan:
    def __init__(self, lengths: np.ndarray, effective_batch: int, seed: int):
        n = len(lengths)
        if n < effective_batch:
            raise DataError(
                f"training set has {n} examples, fewer than one effective batch "
                f"(batch_size x grad_accumulation_steps = {effective_batch})"
            )
        order = np.argsort(lengths, kind="stable")
        self.groups_per_epoch = n // effective_batch
        self.groups = order[: self.groups_per_epoch * effective_batch].reshape(
            self.groups_per_epoch, effective_batch
        )
        self.seed = seed
        self._epoch = -1
        self._perm = np.arange(self.groups_per_epoch)

    def group(self, position: int) -> np.ndarray:
        """Example indices of the effective batch at this data position."""
        epoch, k = divmod(position, self.groups_per_epoch)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(
                self.groups_per_epoch
            )
            self._epoch = epoch
        return self.groups[self._perm[k]]


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
