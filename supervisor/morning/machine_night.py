"""What the supervisor recorded about the machine at night, read from its log: restarts,
battery pauses, throttled stretches, and the attempts recycled before Metal's limit.

Events (logs/supervisor.jsonl, written by supervisor/daemon/main.py, powerwatch.py) and
run.json's attempts:

    machine_restarted   a new boot at start (boot_time, panic)
    power_pause ..      on battery below pause_below_charge: from the pause to
    power_returned      the return of AC power
    thermal_throttled . a throttled stretch (what said so), to its end, or to the end of
    thermal_nominal     the log
    attempts detected_by "recycle": a planned worker recycle before Metal's resource limit

The words and the picture are supervisor/morning/machine.py; the metrics summary reads the
throttled stretches first (runfacts.py), to time the steps inside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from shared.run_record import Detection
from supervisor.morning.facts import Attempt
from supervisor.morning.runlogs import read_run_logs


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
