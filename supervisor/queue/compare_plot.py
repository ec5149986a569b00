"""The comparison's picture: every job's validation loss against step (left) and against
wall-clock time (right), one colour per job, its best checkpoint a star.

The time of an evaluation is the time of the metrics line of its step (the step it
evaluated after), from the run facts (supervisor/morning/runfacts.py); the right panel shows
the night in local clock time, so jobs run one after another stand side by side and a
restart's gap shows. Raises ImportError without matplotlib (the caller says so).
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from supervisor.morning.facts import RunFacts, num
from supervisor.morning.report_plot import pyplot

WIDTH_IN, HEIGHT_IN, DPI = 13.0, 5.5, 100


def eval_times(facts: RunFacts) -> list[tuple[datetime, float]]:
    """(local time, val loss) of each evaluation whose step has a metrics line."""
    times = facts.metrics.eval_times  # step -> the time of its last line (metrics_summary)
    out = []
    for step, val in facts.evals:
        t = num(times.get(step))
        if t is not None and math.isfinite(val):
            out.append((datetime.fromtimestamp(t), val))
    return out


def plot(runs: list[tuple[str, RunFacts]], target: Path | BinaryIO) -> None:
    """Draw the two panels for `runs` ((name, facts), in order) into a PNG."""
    plt = pyplot()
    import matplotlib.dates as mdates

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI,
                                           layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = False
    for i, (name, facts) in enumerate(runs):
        color = colors[i % len(colors)]
        if facts.evals:
            steps, vals = zip(*facts.evals, strict=True)
            by_step.plot(steps, vals, marker="o", markersize=3, color=color, label=name)
            drawn = True
        timed = eval_times(facts)
        if timed:
            times, tvals = zip(*timed, strict=True)
            by_time.plot(times, tvals, marker="o", markersize=3, color=color, label=name)
        if facts.best is not None:
            bstep, bval = facts.best
            by_step.plot([bstep], [bval], marker="*", markersize=14, color=color,
                         markeredgecolor="black", linestyle="none")
    for ax, label in ((by_step, "step"), (by_time, "wall-clock time")):
        ax.set_xlabel(label)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(loc="best", fontsize=9, framealpha=0.9)
    if not drawn:
        by_step.text(0.5, 0.5, "no validation loss yet", ha="center", va="center",
                     transform=by_step.transAxes, color="#777777")
    locator = mdates.AutoDateLocator()  # type: ignore[no-untyped-call]
    by_time.xaxis.set_major_locator(locator)
    by_time.xaxis.set_major_formatter(
        mdates.ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    by_step.set_title("Validation loss by step (★ best checkpoint)", loc="left", fontsize=11)
    by_time.set_title("Validation loss through the night", loc="left", fontsize=11)
    fig.savefig(target, dpi=DPI, format="png")
    plt.close(fig)
