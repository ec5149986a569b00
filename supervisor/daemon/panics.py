"""A machine restart, read from what the operating system leaves: when this boot began, and
the kernel panic report that may explain the restart. Pure parsing (the files and command
outputs come through supervisor/daemon/platform_readings.py).

Formats:
- `sysctl -n kern.boottime` (macOS, sysctl(3) KERN_BOOTTIME, a struct timeval):
  `{ sec = 1715649161, usec = 480012 } Tue May 14 03:12:41 2024`.
- /proc/stat (Linux, proc(5)): the line `btime 1715649161`, seconds since the epoch.
- Panic reports in /Library/Logs/DiagnosticReports:
  - `Kernel-<date>.panic` (macOS 10.x–11): plain text whose line `panic(cpu N caller 0x…): …`
    is the panic string (after `*** Panic Report ***`); on Apple silicon under macOS 11 the
    same file holds the JSON form below;
  - `panic-full-<date>.panic` / `*.ips` (macOS 12 and later): a one-line JSON header
    (`bug_type` "210" for a full kernel panic, `timestamp` "2024-05-14 03:12:41.00 +0200",
    `os_version`) followed by a JSON body whose `panicString` holds the panic text. Other
    `.ips` files (application crashes: bug_type 309, ...) are not panics.
- `journalctl -b -1 -o short-iso` (systemd-journald): the previous boot's last lines.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass

BOOTTIME = re.compile(r"\{\s*sec\s*=\s*(\d+),\s*usec\s*=\s*(\d+)\s*\}")
PANIC_LINE = re.compile(r"panic\(cpu \d+ caller 0x[0-9a-fA-F]+\):.*")
KERNEL_PANIC_BUG_TYPE = "210"
PANIC_CHARS = 400  # the panic string kept in run.json and the report


@dataclass(frozen=True)
class Boot:
    """One boot of the machine: its id (run.json `supervisor.boot_id`) and start (epoch s)."""

    id: str
    time: float


@dataclass(frozen=True)
class Panic:
    """A kernel panic report: its file, when it was written (epoch s), the panic string."""

    file: str
    time: float
    text: str


def parse_boottime(out: str) -> Boot | None:
    """`sysctl -n kern.boottime` → Boot; its id is what record.boot_id() always stored on
    macOS (`boot-time-<rounded epoch seconds>`, as psutil.boot_time() reads the same sysctl)."""
    m = BOOTTIME.search(out)
    if m is None:
        return None
    t = int(m.group(1)) + int(m.group(2)) / 1e6
    return Boot(f"boot-time-{round(t)}", t)


def parse_btime(stat: str) -> float | None:
    """/proc/stat's `btime` line → epoch seconds."""
    for line in stat.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "btime" and parts[1].isdigit():
            return float(parts[1])
    return None


def parse_report(text: str, name: str, mtime: float | None) -> Panic | None:
    """A panic report file's panic (module docstring), None when the file is not one."""
    first, _, rest = text.partition("\n")
    header = _json_object(first)
    if header is not None:
        body = _json_object(rest) or {}
        panic = body.get("panicString")
        bug_type = str(header.get("bug_type", ""))
        if not isinstance(panic, str) and bug_type != KERNEL_PANIC_BUG_TYPE:
            return None  # an application crash report, not a panic
        when = _timestamp(header.get("timestamp")) or mtime or 0.0
        string = _panic_line(panic) if isinstance(panic, str) else ""
        return Panic(name, when, string or f"kernel panic (bug_type {bug_type})")
    string = _panic_line(text)
    if not string:
        return None
    return Panic(name, mtime or 0.0, string)


def journal_tail(out: str) -> str:
    """The last lines of `journalctl -b -1` output, without its "-- ... --" notes."""
    lines = [x for x in out.splitlines() if x.strip() and not x.startswith("-- ")]
    return "\n".join(lines[-15:])


def _panic_line(text: str) -> str:
    m = PANIC_LINE.search(text)
    line = m.group(0) if m else ""
    return line.strip()[:PANIC_CHARS]


def _json_object(text: str) -> dict[str, object] | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _timestamp(value: object) -> float | None:
    """"2024-05-14 03:12:41.00 +0200" (the header's timestamp) → epoch seconds."""
    if not isinstance(value, str):
        return None
    for fmt in ("%Y-%m-%d %H:%M:%S.%f %z", "%Y-%m-%d %H:%M:%S %z"):
        try:
            return dt.datetime.strptime(value, fmt).timestamp()
        except ValueError:
            continue
    return None
