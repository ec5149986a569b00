"""The few `progress` events the report's ETA table reads, kept as the worker log streams by.

The worker logs `progress` every `steps_per_report` steps (~100k events a 1M-step night);
the ETA table (report_numbers.eta_accuracy) reads, for each fraction in ETA_POINTS of the
run's steps, the first event in the log at or past that step with an ETA. `EtaMarks` keeps
just those: once the run's total steps are known, at most one event per fraction; before
that (a run without run.json whose config has not been logged yet), the events whose step
is above every earlier one's — the only ones that can be first past any step.
"""

from __future__ import annotations

import math
from typing import Any

ETA_POINTS = (0.1, 0.25, 0.5, 0.75, 0.9)  # fractions of the run's steps


def counts(event: dict[str, Any]) -> bool:
    """The event says a step (an int) and a finite ETA (hours): the table may use it."""
    eta = event.get("eta_h")
    return isinstance(event.get("step"), int) and isinstance(eta, (int, float)) \
        and math.isfinite(eta)


class EtaMarks:
    """Progress events ({"time": s, "step": int, "eta_h": h}) in log order -> those the ETA
    table can pick (module docstring)."""

    def __init__(self) -> None:
        self.total = 0
        self.picked: dict[float, dict[str, Any]] = {}  # fraction -> the first event past it
        self.unsorted: list[dict[str, Any]] = []  # before the total is known: new highs
        self.order: list[dict[str, Any]] = []  # the picked events, in log order

    def know_total(self, total: int) -> None:
        """The run's total steps (0: not known yet); the events held so far are picked."""
        if total and not self.total:
            self.total = total
            held, self.unsorted = self.unsorted, []
            for ev in held:
                self.add(ev)

    def add(self, event: dict[str, Any]) -> None:
        if not counts(event):
            return
        if not self.total:
            if not self.unsorted or event["step"] > self.unsorted[-1]["step"]:
                self.unsorted.append(event)
            return
        firsts = [f for f in ETA_POINTS
                  if f not in self.picked and event["step"] >= f * self.total]
        for frac in firsts:
            self.picked[frac] = event
        if firsts:
            self.order.append(event)

    def events(self, total: int) -> list[dict[str, Any]]:
        """The events kept, in log order, for a run of `total` steps."""
        self.know_total(total)
        return [*self.order, *self.unsorted]
