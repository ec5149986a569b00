"""The report's picture (matplotlib, the optional `report` extra): three panels, one PNG.

    Loss vs step (full width): raw training loss (faint), smoothed training loss, validation
        loss; each restart a vertical line named after its cause, the steps it had to redo
        shaded; the best checkpoint a star.
    Steps vs wall-clock time: the overnight story (a flat stretch is a hang, a drop is work
        redone after a restart, a gap is downtime); throttled stretches and battery pauses
        shaded, machine restarts and worker recycles marked (supervisor/morning/machine.py).
    Memory vs step: MLX active and peak memory, its buffer cache, the process RSS and, on
        macOS, the physical footprint (Metal's memory; a slow leak shows here).

The series come from metrics_summary.py, which never holds a night's lines: up to
MAX_POINTS lines (4000: more than the ~1100 pixels of a panel add nothing) each step is
drawn; past that, from buckets of steps (buckets.py: at most MAX_POINTS a series): the raw
loss as the range of each bucket and its smoothed line as each bucket's mean, memory as
each bucket's maximum, steps over time at each bucket's last point; every step still counts
in the means, ranges and limits. Lines superseded by a restart are drawn only in the first
case (past it, the shaded stretch a restart redid shows where they were).

`plot(facts, path)` raises ImportError when matplotlib is missing; the caller says so and
writes a text-only report.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from shared.exitcodes import FailureClass as F
from shared.run_record import Action, State
from supervisor.morning import machine
from supervisor.morning.facts import Outcome, RunFacts, RunState, Unclassified, Unsupervised
from supervisor.morning.metrics_table import last_per_step
from supervisor.morning.verdict import describe, kind, restarts

COLORS: dict[Outcome, str] = {
    F.CRASH: "#d62728", Unclassified.KILLED: "#d62728", F.OOM: "#9467bd",
    F.GPU_WATCHDOG: "#8c564b", F.HANG: "#ff7f0e", F.STALL: "#bcbd22", F.NON_FINITE: "#e377c2",
    F.GRAD_SPIKE: "#e377c2", F.PLANNED_RESTART: "#7f7f7f", Unclassified.ABANDONED: "#7f7f7f",
    F.GRACEFUL_STOP: "#17becf", F.METAL_RESOURCE_LIMIT: "#9467bd",
    F.MACHINE_RESTARTED: "#000000", F.BATTERY_PAUSE: "#7f7f7f",
}
ENDED_EARLY: dict[RunState, str] = {
    State.EARLY_STOPPED: "early stop", State.GAVE_UP: "gave up", State.STOPPED: "stopped",
    Unsupervised.INCOMPLETE: "last step"}
TRAIN, VAL, BEST = "#1f77b4", "#ff7f0e", "#2ca02c"
WIDTH_IN, HEIGHT_IN, DPI = 12.0, 8.0, 100
TITLE_CHARS = 125  # characters of the verdict per title line at this width


def smooth(values: list[float], window: int) -> list[float]:
    """Debiased exponential moving average (TensorBoard's smoothing) over ~`window` points."""
    alpha = 2.0 / (window + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _finite_pairs(xs: npt.NDArray[Any], ys: npt.NDArray[np.float64]
                  ) -> tuple[npt.NDArray[Any], npt.NDArray[np.float64]]:
    keep = np.isfinite(ys) & np.isfinite(xs.astype(np.float64))
    return xs[keep], ys[keep]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (PNG, no display); ImportError without
    matplotlib (the `report` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(facts: RunFacts, target: Path | BinaryIO) -> None:
    """Draw the picture into a PNG file (or a binary stream)."""
    plt = pyplot()
    fig = plt.figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    title = textwrap.fill(describe(facts), width=TITLE_CHARS, max_lines=3, placeholder=" …")
    fig.suptitle(title, fontsize=11, fontweight="bold", ha="left", x=0.01)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 2])
    _loss_panel(fig.add_subplot(grid[0, :]), facts)
    _progress_panel(fig.add_subplot(grid[1, 0]), facts)
    _memory_panel(fig.add_subplot(grid[1, 1]), facts)
    fig.savefig(target, dpi=DPI, format="png")
    plt.close(fig)


def _loss_panel(ax: Any, facts: RunFacts) -> None:
    import matplotlib.transforms as mtransforms

    series = facts.metrics.series
    top: list[float] = []
    if series.exact:  # every line at hand (metrics_summary.StepSeries): each step drawn
        all_steps, all_values = series.raw()
        all_losses = all_values[:, 0]
        eff = last_per_step(all_steps)
        steps, losses = _finite_pairs(all_steps[eff], all_losses[eff])
        if len(steps):
            window = max(5, min(200, len(steps) // 30))
            smoothed = np.array(smooth(losses.tolist(), window))
            ax.plot(steps, losses, color=TRAIN, alpha=0.25, linewidth=0.8,
                    label="training loss (each step)")
            ax.plot(steps, smoothed, color=TRAIN, linewidth=2.2,
                    label=f"training loss (smoothed, ~{window} steps)")
            k = int(0.98 * (len(losses) - 1))
            top += [float(smoothed.max()), float(np.partition(losses, k)[k])]
            # lines a later attempt wrote again for the same step, with another loss
            pos = np.clip(np.searchsorted(all_steps[eff], all_steps), 0, len(eff) - 1)
            counted = all_losses[eff][pos]
            gone = np.isfinite(all_losses) & (all_losses != counted)
            if gone.any():
                ax.scatter(all_steps[gone], all_losses[gone], s=6, color="#999999",
                           zorder=2, label="superseded (redone after a restart)")
    else:  # a long night: each step cannot be a point of its own
        assert series.buckets is not None
        b = series.buckets.result()
        has = b.count[:, 0] > 0
        steps, losses = b.x_last[has], b.min[has, 0]
        if len(steps):
            lo, hi, smoothed = losses, b.max[has, 0], b.mean()[has, 0]
            every = int(b.count[has, 0].sum()) // len(steps)
            ax.fill_between(steps, lo, hi, color=TRAIN, alpha=0.25, linewidth=0,
                            label=f"training loss (range of every {every} steps)")
            ax.plot(steps, smoothed, color=TRAIN, linewidth=2.2,
                    label=f"training loss (mean of every {every} steps)")
            k = int(0.98 * (len(smoothed) - 1))
            top += [float(smoothed.max()), float(np.partition(smoothed, k)[k])]
    if facts.evals:
        vs, vl = zip(*facts.evals, strict=True)
        ax.plot(vs, vl, color=VAL, marker="o", markersize=4, linewidth=1.8,
                label="validation loss")
        top.append(max(vl))
    if facts.best is not None:
        bstep, bval = facts.best
        ax.plot([bstep], [bval], marker="*", markersize=18, color=BEST, zorder=5,
                markeredgecolor="black", linestyle="none",
                label=f"best checkpoint: step {bstep}, val {bval:.3f}")
    _restart_marks(ax, facts)
    if facts.state in ENDED_EARLY and facts.final_step:
        ax.axvline(facts.final_step, color="#555555", linestyle=":", linewidth=1.6)
        ax.text(facts.final_step, 0.5, f" {ENDED_EARLY[facts.state]} @{facts.final_step}",
                transform=mtransforms.blended_transform_factory(ax.transData, ax.transAxes),
                rotation=90, va="center", ha="left", fontsize=9, color="#555555")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    total = facts.total_steps or (int(steps.max()) if len(steps) else 1)
    ax.set_xlim(0, total * 1.01)
    if top:
        # no finite training loss (none logged, all NaN): 0, as before any step
        low = min([float(losses.min()), *(v for _, v in facts.evals)]) if len(steps) else 0.0
        ax.set_ylim(max(0.0, low - 0.05 * (max(top) - low)), max(top) * 1.05)
    ax.set_title(f"Loss — {facts.run_id}", loc="left", fontsize=11)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # nothing labelled (no step yet): no empty legend
        ax.legend(loc="best", fontsize=9, framealpha=0.9)


def _restart_marks(ax: Any, facts: RunFacts) -> None:
    """A line at each failure, named; the redone steps (resume point .. failure) shaded."""
    import matplotlib.transforms as mtransforms

    trans = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    for i, (a, following) in enumerate(restarts(facts.attempts)):
        color = COLORS.get(a.outcome, "#d62728")
        ax.axvline(a.end_step, color=color, linestyle="--", linewidth=1.4, zorder=3)
        back = following.resumed_from if following is not None else None
        if back is not None and back < a.end_step:
            ax.axvspan(back, a.end_step, color=color, alpha=0.10, zorder=1)
        label = kind(a)
        if a.action is Action.ROLLBACK:
            label += " → rollback"
        ax.text(a.end_step, 0.98 - 0.09 * (i % 3), f" {label} @{a.end_step} ", transform=trans,
                rotation=0, ha="right", va="top", fontsize=9, color=color, fontweight="bold",
                bbox={"facecolor": "white", "edgecolor": color, "alpha": 0.9, "pad": 1.5},
                zorder=6)


def _progress_panel(ax: Any, facts: RunFacts) -> None:
    first, newest = facts.metrics.first_time, facts.metrics.newest_time
    if first is None or newest is None:
        _empty(ax, "steps over time: no steps recorded")
        return
    t0 = facts.started if _finite(facts.started) else first
    span = newest - t0
    unit, div = ("hours", 3600.0) if span > 3 * 3600 else (
        ("minutes", 60.0) if span > 180 else ("seconds", 1.0))
    by_attempt: dict[int, list[tuple[float, int]]] = {}
    for n, ms in sorted(facts.metrics_by_attempt().items()):
        b = ms.progress.result()  # (time, step): each line's, or each bucket's last
        tx, ty = (b.last[:, 0] - t0) / div, b.last[:, 1]
        by_attempt[n] = list(zip(tx.tolist(), ty.astype(np.int64).tolist(), strict=True))
    previous_end: tuple[float, int] | None = None
    for n, pts in enumerate(p for p in by_attempt.values() if p):
        xs, ys = zip(*pts, strict=True)
        if previous_end is not None:
            ax.plot([previous_end[0], xs[0]], [previous_end[1], ys[0]], color="#999999",
                    linestyle=":", linewidth=1.2)
        ax.plot(xs, ys, color=TRAIN, linewidth=2, label="training" if n == 0 else None)
        previous_end = (xs[-1], ys[-1])
    for a, _ in restarts(facts.attempts):
        if a.ended is None:
            continue
        color = COLORS.get(a.outcome, "#d62728")
        ax.plot([(a.ended - t0) / div], [a.end_step], marker="X", markersize=11, color=color,
                linestyle="none", markeredgecolor="black",
                label=f"{kind(a)} (attempt {a.number} ended)")
    machine.draw(ax, facts, t0, div)  # heat, battery pauses, restarts, recycles
    if facts.total_steps:
        ax.axhline(facts.total_steps, color="#555555", linestyle="--", linewidth=1)
    ax.set_xlabel(f"wall-clock {unit} since the start")
    ax.set_ylabel("step")
    ax.set_title("Steps over time (flat: stuck; drop: steps redone)", loc="left", fontsize=11)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="lower right", fontsize=8, framealpha=0.9)


def _memory_panel(ax: Any, facts: RunFacts) -> None:
    # metrics_summary.SERIES columns 1..5; cache and footprint only where > 0 (0: not
    # measured here; footprint: macOS)
    series = (("MLX active", "-"), ("MLX peak", "--"), ("process RSS", ":"),
              ("MLX cache", "-."), ("physical footprint (macOS)", "-"))
    highest, lowest = 0.0, math.inf
    for j, (label, style) in enumerate(series, start=1):
        xs, ys, low = _memory_series(facts, j)
        if len(xs):
            ax.plot(xs, ys, linestyle=style, linewidth=1.6, label=label)
            highest = max(highest, float(ys.max()))
            lowest = min(lowest, max(low, 1e-3))
    if highest == 0.0:
        _empty(ax, "memory: no samples recorded")
        return
    if highest / lowest > 30:
        ax.set_yscale("log")
    for a, _ in restarts(facts.attempts):
        ax.axvline(a.end_step, color=COLORS.get(a.outcome, "#d62728"), linestyle="--",
                   linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("MB")
    ax.set_title("Memory (a steady climb is a leak)", loc="left", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8, framealpha=0.9)


def _memory_series(facts: RunFacts, j: int) -> tuple[npt.NDArray[Any],
                                                      npt.NDArray[np.float64], float]:
    """Column j of the step series as drawn: (steps, values, the lowest value): each step's
    when every line is at hand, else each bucket's maximum at its last step."""
    series = facts.metrics.series
    if series.exact:
        all_steps, all_values = series.raw()
        eff = last_per_step(all_steps)
        steps, values = _finite_pairs(all_steps[eff], all_values[eff, j])
        return steps, values, float(values.min()) if len(values) else math.inf
    assert series.buckets is not None
    b = series.buckets.result()
    has = b.count[:, j] > 0
    return b.x_last[has], b.max[has, j], float(b.min[has, j].min()) if has.any() else math.inf


def _empty(ax: Any, text: str) -> None:
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11,
            color="#777777")
