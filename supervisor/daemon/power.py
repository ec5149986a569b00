"""Power source, battery charge and thermal throttling, parsed from what the system reports.
Pure parsing; the outputs and files come through supervisor/daemon/platform_readings.py.

Formats (recorded real outputs in tests/fixtures/power/):
- `pmset -g batt` (macOS, pmset(1)): a first line `Now drawing from 'AC Power'` (or
  'Battery Power', 'UPS Power'), then per battery
  ` -InternalBattery-0 (id=4653155)\t18%; discharging; 0:41 remaining present: true`
  (older releases omit the id; a Mac without a battery prints only the first line).
- `pmset -g therm` (macOS): `Note: No thermal warning level has been recorded` when nothing
  happened; after a CPU power notification the limits in percent,
  `CPU_Scheduler_Limit = 100`, `CPU_Available_CPUs = 8`, `CPU_Speed_Limit = 35` — a speed or
  scheduler limit below 100 is throttling; a recorded thermal or performance warning level
  above 0 is too.
- Linux sysfs (Documentation/ABI/testing/sysfs-class-power): /sys/class/power_supply/<name>/
  `type` (Mains, Battery, USB, UPS), `online` (Mains: 1 = plugged in), `capacity` (percent),
  `status` (Charging, Discharging, Not charging, Full, Unknown).
- Linux sysfs (Documentation/driver-api/thermal/sysfs-api.rst): /sys/class/thermal/
  thermal_zoneN/ `type`, `temp` (millidegrees Celsius), `trip_point_K_type` (active, passive,
  hot, critical) and `trip_point_K_temp`; at or above a passive (or hot) trip point the
  kernel throttles the CPU.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DRAWING = re.compile(r"Now drawing from '([^']+)'")
BATTERY = re.compile(r"-\S+(?: \(id=\d+\))?\s+(\d+)%;\s*([^;]+);")
LIMIT = re.compile(r"^\s*(CPU_Speed_Limit|CPU_Scheduler_Limit)\s*=\s*(\d+)", re.M)
# "Thermal warning level set to 1." / "... level = 1" (a recorded level; "No ... has been
# recorded" names none): on one line only.
WARNING = re.compile(r"(thermal|performance) warning level(?: set to| =|:)?[ \t]*(\d+)", re.I)
THROTTLING_TRIPS = ("passive", "hot")


@dataclass(frozen=True)
class PowerReading:
    """Where power comes from: `on_ac` (mains, a charger), the battery's charge in percent
    (None: no battery), and the text it came from, for the log."""

    on_ac: bool
    percent: int | None
    detail: str


@dataclass(frozen=True)
class ThermalReading:
    """Whether the machine throttles for heat now, and what says so."""

    throttled: bool
    detail: str


def parse_pmset_batt(out: str) -> PowerReading | None:
    m = DRAWING.search(out)
    if m is None:
        return None
    source = m.group(1)
    b = BATTERY.search(out)
    percent = int(b.group(1)) if b else None
    state = b.group(2).strip() if b else "no battery"
    return PowerReading(source != "Battery Power", percent,
                        f"{source}" + (f", {percent}%; {state}" if b else ""))


def parse_pmset_therm(out: str) -> ThermalReading:
    limits = {name: int(value) for name, value in LIMIT.findall(out)}
    low = {k: v for k, v in limits.items() if v < 100}
    warnings = {kind.lower(): int(level) for kind, level in WARNING.findall(out)
                if int(level) > 0}
    if low or warnings:
        parts = [f"{k} = {v}" for k, v in sorted(low.items())]
        parts += [f"{k} warning level {v}" for k, v in sorted(warnings.items())]
        return ThermalReading(True, ", ".join(parts))
    return ThermalReading(False, "no thermal or performance limit recorded")


def read_power_supply(root: Path, read: Callable[[Path], str | None],
                      listdir: Callable[[Path], list[Path]]) -> PowerReading | None:
    """/sys/class/power_supply → PowerReading; None without a mains supply or a battery."""
    mains_online: list[bool] = []
    batteries: list[tuple[str, int | None, str]] = []
    for d in listdir(root):
        kind = (read(d / "type") or "").strip()
        if kind in ("Mains", "USB", "UPS"):
            mains_online.append((read(d / "online") or "0").strip() == "1")
        elif kind == "Battery":
            cap = (read(d / "capacity") or "").strip()
            status = (read(d / "status") or "Unknown").strip()
            batteries.append((d.name, int(cap) if cap.isdigit() else None, status))
    if not mains_online and not batteries:
        return None
    if mains_online:
        on_ac = any(mains_online)
    else:  # no mains entry (some laptops): the battery's status says it
        on_ac = all(status != "Discharging" for _, _, status in batteries)
    percent = min((p for _, p, _ in batteries if p is not None), default=None)
    detail = "AC" if on_ac else "battery"
    if batteries:
        detail += "; " + ", ".join(f"{n} {p}% {s}" if p is not None else f"{n} {s}"
                                   for n, p, s in batteries)
    return PowerReading(on_ac, percent, detail)


def read_thermal_zones(root: Path, read: Callable[[Path], str | None],
                       listdir: Callable[[Path], list[Path]]) -> ThermalReading | None:
    """/sys/class/thermal → ThermalReading; None without a zone that has a throttling trip."""
    seen = False
    hot: list[str] = []
    for d in listdir(root):
        if not d.name.startswith("thermal_zone"):
            continue
        temp = _int(read(d / "temp"))
        trips = []
        for k in range(32):
            kind = read(d / f"trip_point_{k}_type")
            if kind is None:
                break
            limit = _int(read(d / f"trip_point_{k}_temp"))
            if kind.strip() in THROTTLING_TRIPS and limit is not None and limit > 0:
                trips.append(limit)
        if temp is None or not trips:
            continue
        seen = True
        if temp >= min(trips):
            name = (read(d / "type") or d.name).strip()
            hot.append(f"{name} {temp / 1000:.1f} °C at or above its trip point "
                       f"{min(trips) / 1000:.1f} °C")
    if not seen:
        return None
    return ThermalReading(bool(hot), "; ".join(hot) or "all thermal zones below their trip points")


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    t = text.strip()
    return int(t) if t.lstrip("-").isdigit() else None
