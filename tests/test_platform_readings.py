"""supervisor/daemon/platform_readings.py (with power.py and panics.py): what the machine
says — recorded `pmset` outputs, panic reports in Apple's formats, sysfs trees laid out as
the kernel documents them, `sysctl kern.boottime` — injected through `Sources`; and this
Linux machine's own readings through the real sources."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import psutil
import pytest

from supervisor.daemon.platform_readings import DIAGNOSTIC_REPORTS, Platform, Sources

FIXTURES = Path(__file__).parent / "fixtures"
POWER = FIXTURES / "power"
PANICS = FIXTURES / "panics"


def mac(outputs: dict[str, str] | None = None, reports: dict[str, float] | None = None
        ) -> Platform:
    """A Mac whose commands print `outputs` (argv joined by spaces) and whose
    DiagnosticReports holds the fixture files named in `reports` (name -> mtime)."""
    outputs = outputs or {}
    reports = reports or {}
    files = {DIAGNOSTIC_REPORTS / name: PANICS / name for name in reports}

    def read(p: Path) -> str | None:
        return files[p].read_text() if p in files else None

    return Platform(Sources(
        "Darwin", lambda argv: outputs.get(" ".join(argv)), read,
        lambda d: sorted(files) if d == DIAGNOSTIC_REPORTS else [],
        lambda p: reports.get(p.name)))


def linux(files: dict[str, str], outputs: dict[str, str] | None = None) -> Platform:
    """A Linux machine whose files are `files` (absolute path -> text)."""
    paths = {Path(k): v for k, v in files.items()}
    outputs = outputs or {}

    def listdir(d: Path) -> list[Path]:
        return sorted({p.parents[len(p.relative_to(d).parts) - 2] for p in paths
                       if d in p.parents})

    return Platform(Sources("Linux", lambda argv: outputs.get(" ".join(argv)), paths.get,
                            listdir, lambda p: None))


@pytest.mark.parametrize("name,on_ac,percent", [
    ("pmset_batt_battery_18.txt", False, 18),
    ("pmset_batt_battery_95.txt", False, 95),
    ("pmset_batt_battery_no_estimate.txt", False, 90),
    ("pmset_batt_ac_charging.txt", True, 67),
    ("pmset_batt_ac_not_charging.txt", True, 88),
    ("pmset_batt_desktop.txt", True, None),
])
def test_pmset_batt(name, on_ac, percent):
    reading = mac({"pmset -g batt": (POWER / name).read_text()}).power()
    assert reading is not None and (reading.on_ac, reading.percent) == (on_ac, percent)


def test_pmset_therm():
    hot = mac({"pmset -g therm": (POWER / "pmset_therm_throttled.txt").read_text()}).thermal()
    assert hot is not None and hot.throttled and hot.detail == "CPU_Speed_Limit = 35"
    cool = mac({"pmset -g therm": (POWER / "pmset_therm_nominal.txt").read_text()}).thermal()
    assert cool is not None and not cool.throttled


def test_no_reading_decides_nothing():
    p = mac({})  # pmset missing or refused
    assert (p.power(), p.thermal(), p.boot(), p.panic_after(0.0)) == (None, None, None, None)
    assert p.display_sleep_now() is False
    assert mac({"pmset displaysleepnow": ""}).display_sleep_now() is True


SUPPLY = "/sys/class/power_supply"


@pytest.mark.parametrize("files,on_ac,percent", [
    ({f"{SUPPLY}/AC/type": "Mains\n", f"{SUPPLY}/AC/online": "0\n",
      f"{SUPPLY}/BAT0/type": "Battery\n", f"{SUPPLY}/BAT0/capacity": "18\n",
      f"{SUPPLY}/BAT0/status": "Discharging\n"}, False, 18),
    ({f"{SUPPLY}/ADP1/type": "Mains\n", f"{SUPPLY}/ADP1/online": "1\n",
      f"{SUPPLY}/BAT0/type": "Battery\n", f"{SUPPLY}/BAT0/capacity": "64\n",
      f"{SUPPLY}/BAT0/status": "Charging\n"}, True, 64),
    ({f"{SUPPLY}/BAT1/type": "Battery\n", f"{SUPPLY}/BAT1/capacity": "40\n",
      f"{SUPPLY}/BAT1/status": "Not charging\n"}, True, 40),
])
def test_linux_power_supply(files, on_ac, percent):
    reading = linux(files).power()
    assert reading is not None and (reading.on_ac, reading.percent) == (on_ac, percent)


def test_linux_without_power_supply_or_thermal_zones_has_no_reading():
    assert linux({}).power() is None and linux({}).thermal() is None


ZONE = "/sys/class/thermal/thermal_zone0"


@pytest.mark.parametrize("temp,throttled", [("97000\n", True), ("52000\n", False)])
def test_linux_thermal_zone_at_its_passive_trip_point_is_throttled(temp, throttled):
    reading = linux({f"{ZONE}/type": "x86_pkg_temp\n", f"{ZONE}/temp": temp,
                     f"{ZONE}/trip_point_0_type": "passive\n",
                     f"{ZONE}/trip_point_0_temp": "95000\n",
                     f"{ZONE}/trip_point_1_type": "critical\n",
                     f"{ZONE}/trip_point_1_temp": "105000\n"}).thermal()
    assert reading is not None and reading.throttled is throttled
    if throttled:
        assert reading.detail == ("x86_pkg_temp 97.0 °C at or above its trip point 95.0 °C")


def test_a_zone_with_only_a_critical_trip_says_nothing_about_throttling():
    assert linux({f"{ZONE}/temp": "99000\n", f"{ZONE}/trip_point_0_type": "critical\n",
                  f"{ZONE}/trip_point_0_temp": "98000\n"}).thermal() is None


def test_boot_on_macos_from_kern_boottime():
    boot = mac({"sysctl -n kern.boottime":
                "{ sec = 1715656378, usec = 480012 } Tue May 14 03:12:58 2024\n"}).boot()
    assert boot is not None and boot.id == "boot-time-1715656378"
    assert boot.time == pytest.approx(1715656378.480012)


def test_boot_on_linux_from_boot_id_and_btime():
    boot = linux({"/proc/sys/kernel/random/boot_id": "f56d2a8c-0000-4000-8000-1234567890ab\n",
                  "/proc/stat": "cpu  1 2 3\nbtime 1715656378\nprocesses 9\n"}).boot()
    assert boot is not None and boot.id == "f56d2a8c-0000-4000-8000-1234567890ab"
    assert boot.time == 1715656378.0


def test_this_machines_own_boot_through_the_real_sources():
    boot = Platform().boot()
    assert boot is not None
    assert boot.id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert abs(boot.time - psutil.boot_time()) < 2


def epoch(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


REPORTS = {"Kernel-2018-11-19-223927_MacBook-Pro.panic": epoch("2018-11-19T22:39:27+00:00"),
           "panic-full-2024-05-14-031158.0002.ips": epoch("2024-05-14T03:12:40+00:00"),
           "Python-2024-05-14-032510.ips": epoch("2024-05-14T03:25:10+00:00")}


def test_the_newest_panic_after_the_last_sign_of_life():
    p = mac(reports=REPORTS)
    found = p.panic_after(epoch("2024-05-14T02:00:00+00:00"))
    assert found is not None and found.file == "panic-full-2024-05-14-031158.0002.ips"
    assert found.text == ("panic(cpu 4 caller 0xfffffe0028a2f6ac): AGX firmware panic: GPU "
                          "stuck, channel 2 (AGXFirmwareKextRTBuddy), context store timeout "
                          "@AGXFirmwareKextRTBuddy.cpp:1087")
    assert found.time == epoch("2024-05-14T03:11:58+00:00")  # the header's timestamp
    # an application crash report (bug_type 309) written later is not a panic
    assert p.panic_after(epoch("2024-05-14T03:12:00+00:00")) is None


def test_the_plain_text_panic_format():
    found = mac(reports=REPORTS).panic_after(epoch("2018-11-19T00:00:00+00:00"))
    assert found is not None  # the newest is the .ips; the old one alone:
    only = mac(reports={k: v for k, v in REPORTS.items() if k.endswith(".panic")})
    old = only.panic_after(epoch("2018-11-19T00:00:00+00:00"))
    assert old is not None and old.text.startswith(
        'panic(cpu 0 caller 0xffffff7fb12de8d7): "GPU Panic: mux-regs 4 3 7f 0 0 0')


def test_the_previous_boots_journal_on_linux():
    out = ("2024-05-14T03:11:50+0000 mac kernel: NVRM: GPU at PCI:0000:01:00: GPU has fallen "
           "off the bus.\n-- Boot 3c1f… --\n")
    p = linux({}, {"journalctl -b -1 -n 15 --no-pager -o short-iso": out})
    assert p.previous_boot_log() == out.splitlines()[0]
    assert linux({}).previous_boot_log() == ""  # no persistent journal: nothing
