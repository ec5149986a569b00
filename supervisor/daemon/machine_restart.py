"""The machine restarted between two records of a run: when, and why if the system says.

IOGPU kernel panics and watchdog reboots happen during long Metal jobs; after one, the
supervisor that starts next (at boot: `overnight install --at-boot`; else at login) finds a
boot id in run.json that is not this boot's (shared/run_record.py `supervisor.boot_id`).
That is its own failure class, `machine_restarted` (shared/exitcodes.py): the record and the
report say "machine restarted at 03:12", with

- on macOS, the panic string of the newest kernel panic report in
  /Library/Logs/DiagnosticReports (`.panic`, or `.ips` with bug_type 210) written after the
  record's last update — the last sign of life before the restart (panics.py has the formats);
- on Linux, the previous boot's last journal lines (`journalctl -b -1`) where the journal is
  persistent and readable, kept in the supervisor's `machine_restarted` log event.

A restart with no panic report is said as such: a power loss, a forced shutdown or an
update looks the same from here.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

from supervisor.daemon.panics import Panic
from supervisor.daemon.platform_readings import Platform


@dataclass(frozen=True)
class MachineRestart:
    """A restart found at start: the boots, when this one began (epoch s; None: unknown), the
    panic report written after the last sign of life, the previous boot's log tail."""

    previous_boot: str
    this_boot: str
    boot_time: float | None
    panic: Panic | None
    previous_log: str = ""

    @property
    def when(self) -> str:
        """"03:12" (local time), or "" when the boot time is unknown."""
        if self.boot_time is None:
            return ""
        return time.strftime("%H:%M", time.localtime(self.boot_time))

    @property
    def text(self) -> str:
        """One line for run.json and the report: when, which boots, and the panic."""
        at = f" at {self.when}" if self.when else ""
        out = (f"the machine restarted{at} (boot id {self.previous_boot[:8]}… is now "
               f"{self.this_boot[:8]}…)")
        if self.panic is not None:
            return f"{out}; kernel panic ({self.panic.file}): {self.panic.text}"
        return f"{out}; no kernel panic report after the last record (power loss, forced " \
               "restart or update?)"


def find_restart(previous_boot: str, this_boot: str, last_update: str | None,
                 platform: Platform) -> MachineRestart | None:
    """The restart since the previous supervisor's record, None when the boot is the same
    (or either id is unknown). `last_update`: run.json's `updated` (ISO 8601): panic reports
    written before it belong to an earlier restart."""
    if not previous_boot or not this_boot or previous_boot == this_boot:
        return None
    boot = platform.boot()
    since = _epoch(last_update)
    if since is None and boot is not None:
        since = boot.time - 86400.0  # no record time: a day before this boot
    panic = platform.panic_after(since) if since is not None else None
    return MachineRestart(previous_boot, this_boot, boot.time if boot is not None else None,
                          panic, platform.previous_boot_log())


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return dt.datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None
