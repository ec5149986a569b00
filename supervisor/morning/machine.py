"""The machine at night, for the report: restarts, battery pauses, throttled stretches and
worker recycles — in words (a report section) and in the picture (the steps-over-time panel).

What the supervisor recorded is read by supervisor/morning/machine_night.py.
A slow night explains itself: a throttled stretch says how much longer its steps took.
"""

from __future__ import annotations

from typing import Any

from supervisor.morning.facts import RunFacts
from supervisor.morning.machine_night import MachineNight, Period, Restart, read_dir
from supervisor.morning.report_doc import Block, Heading, Para
from supervisor.morning.verdict import clock, duration

__all__ = ["MachineNight", "Period", "Restart", "draw", "read", "read_dir", "section"]
THROTTLED, PAUSED, RESTARTED = "#ff7f0e", "#7f7f7f", "#000000"


def read(facts: RunFacts) -> MachineNight:
    """What the supervisor recorded about the machine during the run in `facts`."""
    return read_dir(facts.run_dir, facts.supervised, facts.attempts)


def _slowdown(facts: RunFacts, p: Period) -> str:
    """"steps took 2.9× as long as outside it" from the step times in logs/metrics.jsonl:
    the medians inside and outside the stretch (metrics_summary.Median)."""
    medians = facts.metrics.slow.get((p.start, p.end))
    inside, outside = (medians[0].value(), medians[1].value()) if medians else (None, None)
    if inside is None or outside is None:
        return ""
    ratio = inside / outside
    return f"; its steps took {ratio:.1f}× as long as the others"


def _span(p: Period) -> str:
    if p.end is None:
        return f"from {clock(p.start)} to the end of the log"
    return f"{clock(p.start)}–{clock(p.end)} ({duration(p.end - p.start)})"


def section(facts: RunFacts) -> list[Block]:
    """"What the machine did": one paragraph per restart, pause, throttled stretch and
    recycle, in time order; nothing when there was none."""
    night = read(facts)
    if night.empty:
        return []
    items: list[tuple[float, str]] = []
    for r in night.restarts:
        items.append((r.time, f"**{clock(r.time)} — the machine restarted.** {r.detail}. The "
                              "attempt it interrupted is counted as `machine_restarted`; the "
                              "next supervisor went on from the newest valid checkpoint."))
    for p in night.pauses:
        items.append((p.start, f"**{_span(p)} — paused on battery** ({p.detail}): the worker "
                               "saved a checkpoint and stopped; training went on on AC power. "
                               "Not a failure."))
    for p in night.throttled:
        items.append((p.start, f"**{_span(p)} — throttled for heat** ({p.detail})"
                               f"{_slowdown(facts, p)}."))
    for a in night.recycles:
        t = a.ended if a.ended is not None else a.started
        items.append((t, f"**{clock(t)} — worker recycled** at step {a.end_step} (attempt "
                         f"{a.number}), before Metal's resource limit: {a.detail}"))
    return [Heading("What the machine did", 2),
            *(Para(text) for _, text in sorted(items, key=lambda x: x[0]))]


def draw(ax: Any, facts: RunFacts, t0: float, div: float) -> None:
    """Shade throttled stretches and battery pauses and mark machine restarts on the
    steps-over-time panel (x: (time - t0) / div); a worker recycle is marked there as the
    end of its attempt ("worker recycle", verdict.kind)."""
    night = read(facts)
    if not (night.throttled or night.pauses or night.restarts):
        return
    newest = facts.metrics.last_time()
    last = newest if newest is not None else t0
    for periods, color, name, hatch in ((night.throttled, THROTTLED, "throttled (heat)", None),
                                        (night.pauses, PAUSED, "paused on battery", "//")):
        for i, p in enumerate(periods):
            end = p.end if p.end is not None else last
            ax.axvspan((p.start - t0) / div, (end - t0) / div, color=color, alpha=0.18,
                       hatch=hatch, label=name if i == 0 else None, zorder=0)
    for i, r in enumerate(night.restarts):
        ax.axvline((r.time - t0) / div, color=RESTARTED, linestyle="-.", linewidth=1.6,
                   label="machine restarted" if i == 0 else None)
