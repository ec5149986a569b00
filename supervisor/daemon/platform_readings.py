"""The machine, as the supervisor reads it: one small interface for what only the operating
system knows — this boot, a kernel panic report, the previous boot's log, the power source
and charge, the thermal state — and the one command it runs on the machine's behalf
(`pmset displaysleepnow`).

Every reading goes through `Sources`: which system it is, a command's output, a file's
text, a directory's listing. `Sources.real()` reads this machine; tests build `Sources`
from recorded inputs (real `pmset` outputs, panic reports in Apple's documented formats,
sysfs files laid out as the kernel does) and run the same parsing and decisions — nothing
of ours is mocked. What each reading means, and where its format comes from:

- boot: macOS `sysctl -n kern.boottime` (sysctl(3)); Linux /proc/sys/kernel/random/boot_id
  and `btime` in /proc/stat (proc(5));
- kernel panic report (macOS): /Library/Logs/DiagnosticReports/*.panic, and *.ips with
  bug_type 210 (panics.py);
- the previous boot's log (Linux): `journalctl -b -1 -n 15`, readable only with a persistent
  journal;
- power: macOS `pmset -g batt` (pmset(1)); Linux /sys/class/power_supply (power.py);
- thermal: macOS `pmset -g therm`; Linux /sys/class/thermal/thermal_zone* (power.py).

A reading that is not available (no battery, no thermal zone, a command missing or
refused) is None: nothing is decided from it. Never an exception.
"""

from __future__ import annotations

import contextlib
import platform as _platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from supervisor.daemon import panics, power
from supervisor.daemon.panics import Boot, Panic
from supervisor.daemon.power import PowerReading, ThermalReading

# Seconds a reading command (pmset, sysctl, journalctl) may take. They run on the loop thread
# and answer in milliseconds; a hung one must not hold the watch up for long.
COMMAND_TIMEOUT = 3.0
DIAGNOSTIC_REPORTS = Path("/Library/Logs/DiagnosticReports")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
PROC_STAT = Path("/proc/stat")
POWER_SUPPLY = Path("/sys/class/power_supply")
THERMAL = Path("/sys/class/thermal")


@dataclass(frozen=True)
class Sources:
    """Where readings come from. `run(argv)`: the command's stdout when it exits 0, else
    None; `read(path)`: the file's text, None when absent or unreadable; `listdir(path)`:
    the directory's entries, [] when absent."""

    system: str  # platform.system(): "Darwin", "Linux", ...
    run: Callable[[Sequence[str]], str | None]
    read: Callable[[Path], str | None]
    listdir: Callable[[Path], list[Path]]
    mtime: Callable[[Path], float | None]

    @classmethod
    def real(cls) -> Sources:
        """This machine."""
        return cls(_platform.system(), _run, _read, _listdir, _mtime)


class Platform:
    """The readings of `sources` (module docstring)."""

    def __init__(self, sources: Sources | None = None) -> None:
        self.sources = sources or Sources.real()

    @property
    def is_mac(self) -> bool:
        return self.sources.system == "Darwin"

    def boot(self) -> Boot | None:
        """This boot: its id (stored in run.json) and when it began (epoch seconds)."""
        s = self.sources
        if self.is_mac:
            out = s.run(["sysctl", "-n", "kern.boottime"])
            return panics.parse_boottime(out) if out is not None else None
        boot_id, stat = s.read(BOOT_ID), s.read(PROC_STAT)
        started = panics.parse_btime(stat) if stat is not None else None
        if boot_id is None or started is None:
            return None
        return Boot(boot_id.strip(), started)

    def panic_after(self, since: float) -> Panic | None:
        """The newest kernel panic report written after `since` (epoch seconds), if any."""
        if not self.is_mac:
            return None
        s = self.sources
        found: list[Panic] = []
        for path in s.listdir(DIAGNOSTIC_REPORTS):
            if path.suffix not in (".panic", ".ips"):
                continue
            text = s.read(path)
            if text is None:
                continue
            report = panics.parse_report(text, path.name, s.mtime(path))
            if report is not None and report.time > since:
                found.append(report)
        return max(found, key=lambda p: p.time, default=None)

    def previous_boot_log(self) -> str:
        """The last lines the previous boot logged (Linux, a persistent journal), else ""."""
        if self.is_mac:
            return ""
        out = self.sources.run(["journalctl", "-b", "-1", "-n", "15", "--no-pager",
                                "-o", "short-iso"])
        return panics.journal_tail(out) if out is not None else ""

    def power(self) -> PowerReading | None:
        """The power source and the battery's charge; None: unknown (no reading at all)."""
        s = self.sources
        if self.is_mac:
            out = s.run(["pmset", "-g", "batt"])
            return power.parse_pmset_batt(out) if out is not None else None
        return power.read_power_supply(POWER_SUPPLY, s.read, s.listdir)

    def thermal(self) -> ThermalReading | None:
        """Whether the machine throttles for heat now; None: no thermal reading here."""
        s = self.sources
        if self.is_mac:
            out = s.run(["pmset", "-g", "therm"])
            return power.parse_pmset_therm(out) if out is not None else None
        return power.read_thermal_zones(THERMAL, s.read, s.listdir)

    def display_sleep_now(self) -> bool:
        """macOS: put the display to sleep (`pmset displaysleepnow`; the GPU watchdog is
        lenient while it sleeps). Whether it was done."""
        if not self.is_mac:
            return False
        return self.sources.run(["pmset", "displaysleepnow"]) is not None


def _run(argv: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, check=False,
                              timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _listdir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


def _mtime(path: Path) -> float | None:
    with contextlib.suppress(OSError):
        return path.stat().st_mtime
    return None
