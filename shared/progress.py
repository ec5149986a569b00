"""The progress line users of the earlier trainer know, computed from recent steps.

    Training: 45% | step 900/2000 | loss=3.20 | loss_avg=3.40 | val=3.05 (best 3.01) |
    lr=1.0e-05 | tok/s=812 | eta_h=6.5 | ckpt=-150 | memory_mb=14051 | mem_delta=+245

loss_avg and the ETA use the last 50 steps; ckpt is steps since the last checkpoint;
memory_mb is MLX's active memory (unified memory on Apple silicon — what RSS misses);
mem_delta compares with the first steps of this attempt, with a warning sign when memory has
grown by more than 50% (the slow leak that kills long runs).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

WINDOW = 50
BASELINE_STEPS = 5
GROWTH_WARNING = 0.5


@dataclass
class Progress:
    total_steps: int
    losses: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    step_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=WINDOW))
    tokens: deque[int] = field(default_factory=lambda: deque(maxlen=WINDOW))
    baseline_mb: list[float] = field(default_factory=list)
    step: int = 0
    loss: float = math.nan
    lr: float = 0.0
    memory_mb: float = 0.0
    val: float | None = None
    best_val: float | None = None
    last_checkpoint_step: int = 0

    def record_step(
        self, step: int, loss: float, lr: float, tokens: int, seconds: float, memory_mb: float
    ) -> None:
        self.step, self.loss, self.lr, self.memory_mb = step, loss, lr, memory_mb
        self.losses.append(loss)
        self.step_seconds.append(seconds)
        self.tokens.append(tokens)
        if len(self.baseline_mb) < BASELINE_STEPS:
            self.baseline_mb.append(memory_mb)

    @property
    def loss_avg(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else math.nan

    @property
    def tokens_per_sec(self) -> float:
        secs = sum(self.step_seconds)
        return sum(self.tokens) / secs if secs > 0 else 0.0

    @property
    def eta_hours(self) -> float:
        if not self.step_seconds:
            return math.nan
        per_step = sum(self.step_seconds) / len(self.step_seconds)
        return per_step * (self.total_steps - self.step) / 3600

    @property
    def mem_delta_mb(self) -> float:
        if not self.baseline_mb:
            return 0.0
        return self.memory_mb - sum(self.baseline_mb) / len(self.baseline_mb)

    @property
    def memory_warning(self) -> bool:
        if len(self.baseline_mb) < BASELINE_STEPS:
            return False
        base = sum(self.baseline_mb) / len(self.baseline_mb)
        return base > 0 and self.memory_mb > base * (1 + GROWTH_WARNING)

    def line(self) -> str:
        pct = 100 * self.step / self.total_steps if self.total_steps else 0
        val = "val=n/a"
        if self.val is not None:
            best = f" (best {self.best_val:.2f})" if self.best_val is not None else ""
            val = f"val={self.val:.2f}{best}"
        warn = " ⚠" if self.memory_warning else ""
        return (
            f"Training: {pct:.0f}% | step {self.step}/{self.total_steps} | "
            f"loss={self.loss:.2f} | loss_avg={self.loss_avg:.2f} | {val} | lr={self.lr:.1e} | "
            f"tok/s={self.tokens_per_sec:.0f} | eta_h={self.eta_hours:.1f} | "
            f"ckpt=-{self.step - self.last_checkpoint_step} | memory_mb={self.memory_mb:.0f} | "
            f"mem_delta={self.mem_delta_mb:+.0f}{warn}"
        )
