"""A series of any length in a fixed number of buckets, for drawing: the report's picture of
a 1M-step night from a few thousand points, with its spikes and ranges.

Lines are added in order, a piece at a time, each an x (a step or a time) and K values
(NaN: not measured). While at most `cap` lines came, each line is its own bucket: the series
is exact. Past that, neighbouring buckets merge pairwise (and the width, lines a bucket
takes, doubles), so there are always between cap/2 and cap of them; each bucket keeps its
first and last x, and per value the count of finite values, their sum, minimum and maximum,
and the last value — what `report_plot.thin` drew (range, mean, maximum, last point), so a
spike of one step still shows as its bucket's maximum. Memory: ~(2 + 5K) x cap floats,
whatever the number of lines (the idea of the merge is the "dyadic" summary of streaming
histograms, e.g. Ben-Haim & Tom-Tov 2010, with fixed widths instead of adaptive ones).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


class Buckets:
    """`cap` (>= 2) buckets of K values each (module docstring). Arrays, each (m,) or (m, K):
    `x_first`, `x_last`, `count`, `sum`, `min`, `max`, `last`; `lines`: lines added."""

    def __init__(self, k: int, cap: int) -> None:
        if cap < 2:
            raise ValueError(f"expected a capacity of at least 2 buckets, got {cap}")
        self.k, self.cap, self.width, self.lines = k, cap, 1, 0
        self.x_first = np.zeros(0)
        self.x_last = np.zeros(0)
        self.count = np.zeros((0, k))
        self.sum = np.zeros((0, k))
        self.min = np.zeros((0, k))
        self.max = np.zeros((0, k))
        self.last = np.zeros((0, k))
        self._x = np.zeros(0)  # lines not yet a whole bucket (< width of them)
        self._v = np.zeros((0, k))

    @property
    def exact(self) -> bool:
        """Every line is its own bucket (no merge happened)."""
        return self.width == 1

    def add(self, x: FloatArray, values: FloatArray) -> None:
        """Append lines: x (n,), values (n, K) float64 (non-finite: not measured)."""
        if not len(x):
            return
        self.lines += len(x)
        values = np.where(np.isfinite(values), values, math.nan)
        xs = np.concatenate([self._x, x]) if len(self._x) else x
        vs = np.concatenate([self._v, values]) if len(self._v) else values
        whole = len(xs) // self.width * self.width
        self._x, self._v = xs[whole:].copy(), vs[whole:].copy()
        if whole:
            self._append(*_reduce(xs[:whole], vs[:whole], self.width))
        while len(self.x_first) > self.cap:
            self._merge()

    def truncate(self, x: float) -> None:
        """Drop the buckets that start at or after x, and such pending lines (a step redone
        after a restart supersedes them); a bucket that starts before x is kept whole."""
        keep = int(np.searchsorted(self.x_first, x, side="left"))
        for name in ("x_first", "x_last", "count", "sum", "min", "max", "last"):
            setattr(self, name, getattr(self, name)[:keep])
        pending = self._x < x
        self._x, self._v = self._x[pending], self._v[pending]

    def result(self) -> Buckets:
        """The buckets with the pending lines as one last, narrower bucket (self unchanged
        when none are pending)."""
        if not len(self._x):
            return self
        out = Buckets(self.k, self.cap)
        out.width, out.lines = self.width, self.lines
        for name in ("x_first", "x_last", "count", "sum", "min", "max", "last"):
            setattr(out, name, getattr(self, name))
        out._append(*_reduce(self._x, self._v, len(self._x)))
        return out

    def mean(self) -> FloatArray:
        """(m, K): each bucket's mean of its finite values (NaN: none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.sum / np.maximum(self.count, 1), math.nan)

    def _append(self, xf: FloatArray, xl: FloatArray, c: FloatArray, s: FloatArray,
                lo: FloatArray, hi: FloatArray, last: FloatArray) -> None:
        self.x_first = np.concatenate([self.x_first, xf])
        self.x_last = np.concatenate([self.x_last, xl])
        self.count = np.concatenate([self.count, c])
        self.sum = np.concatenate([self.sum, s])
        self.min = np.concatenate([self.min, lo])
        self.max = np.concatenate([self.max, hi])
        self.last = np.concatenate([self.last, last])

    def _merge(self) -> None:
        """Neighbours (0, 1), (2, 3), ... become one bucket; an odd last one stays."""
        m = len(self.x_first) // 2 * 2
        a, b = slice(0, m, 2), slice(1, m, 2)
        tail = slice(m, None)

        def pair(arr: FloatArray, how: np.ufunc) -> FloatArray:
            return np.concatenate([how(arr[a], arr[b]), arr[tail]])

        self.x_first = np.concatenate([self.x_first[a], self.x_first[tail]])
        self.x_last = np.concatenate([self.x_last[b], self.x_last[tail]])
        self.count = pair(self.count, np.add)
        self.sum = pair(self.sum, np.add)
        self.min = pair(self.min, np.fmin)
        self.max = pair(self.max, np.fmax)
        self.last = np.concatenate([np.where(np.isnan(self.last[b]), self.last[a],
                                             self.last[b]), self.last[tail]])
        self.width *= 2


def _reduce(x: FloatArray, v: FloatArray, width: int) -> tuple[FloatArray, ...]:
    """Lines (n,), (n, K) with n a multiple of width as n/width buckets."""
    m, k = len(x) // width, v.shape[1]
    blocks = v.reshape(m, width, k)
    finite = np.isfinite(blocks)
    zeros = np.where(finite, blocks, 0.0)
    lo = np.fmin.reduce(blocks, axis=1)
    hi = np.fmax.reduce(blocks, axis=1)
    # the last finite value of each bucket and column (NaN when none)
    idx = np.where(finite, np.arange(width)[None, :, None], -1).max(axis=1)
    last = np.take_along_axis(blocks, np.maximum(idx, 0)[:, None, :], axis=1)[:, 0, :]
    last = np.where(idx >= 0, last, math.nan)
    return (x[::width].astype(np.float64), x[width - 1::width].astype(np.float64),
            finite.sum(axis=1).astype(np.float64), zeros.sum(axis=1), lo, hi, last)
