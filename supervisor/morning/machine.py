"""The machine at night, for the report: restarts, battery pauses, throttled stretches and
worker recycles — in words (a report section) and in the picture (the steps-over-time panel).

Read from what the supervisor recorded: its log events (logs/supervisor.jsonl, written by
supervisor/daemon/main.py, powerwatch.py) and run.json's attempts:

    machine_restarted   a new boot at start (boot_time, panic): "machine restarted at 03:12"
    power_pause ..      on battery below pause_below_charge: from the pause to
    power_returned      the return of AC power
    thermal_throttled . a throttled stretch (what said so), to its end, or to the end of
    thermal_nominal     the log
    attempts detected_by "recycle": a planned worker recycle before Metal's resource limit

A slow night explains itself: a throttled stretch says how much longer its steps took.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.run_record import Detection
from supervisor.morning.facts import Attempt, RunFacts
from supervisor.morning.report_doc import Block, Heading, Para
from supervisor.morning.runlogs import read_run_logs
from supervisor.morning.verdict import clock, duration

THROTTLED, PAUSED, RESTARTED = "#ff7f0e", "#7f7f7f", "#000000"


@dataclass(frozen=True)
class Period:
    """A stretch of the night: start and end (epoch s; end None: to the end of the log)."""

    start: float
    end: float | None
    detail: str


@dataclass(frozen=True)
class Restart:
    time: float  # when the new boot began (epoch s), else when it was noticed
    detail: str


@dataclass
class MachineNight:
    restarts: list[Restart] = field(default_factory=list)
    pauses: list[Period] = field(default_factory=list)
    throttled: list[Period] = field(default_factory=list)
    recycles: list[Attempt] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.restarts or self.pauses or self.throttled or self.recycles)


def read(facts: RunFacts) -> MachineNight:
    """What the supervisor recorded about the machine during the run in `facts`."""
    return read_dir(facts.run_dir, facts.supervised, facts.attempts)


def read_dir(run_dir: Path, supervised: bool, attempts: list[Attempt]) -> MachineNight:
    """What the supervisor recorded about the machine in `run_dir` (nothing without a
    supervisor), `attempts`: the run's."""
    night = MachineNight(recycles=[a for a in attempts if a.detected_by is Detection.RECYCLE])
    if not supervised:
        return night
    pause: tuple[float, str] | None = None
    hot: tuple[float, str] | None = None
    for line in read_run_logs(run_dir, sources=("supervisor",)):
        d, t, ev = line.data, line.time, line.event
        if math.isnan(t):
            continue
        if ev == "machine_restarted":
            boot = d.get("boot_time")
            when = float(boot) if isinstance(boot, (int, float)) else t
            night.restarts.append(Restart(when, str(d.get("detail") or "")))
        elif ev == "power_pause" and pause is None:
            pause = (t, str(d.get("reading") or d.get("detail") or ""))
        elif ev == "power_returned" and pause is not None:
            night.pauses.append(Period(pause[0], t, pause[1]))
            pause = None
        elif ev == "thermal_throttled" and hot is None:
            hot = (t, str(d.get("detail") or ""))
        elif ev == "thermal_nominal" and hot is not None:
            night.throttled.append(Period(hot[0], t, hot[1]))
            hot = None
    if pause is not None:
        night.pauses.append(Period(pause[0], None, pause[1]))
    if hot is not None:
        night.throttled.append(Period(hot[0], None, hot[1]))
    return night


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
