"""A machine restart between two records is its own failure class, `machine_restarted`
(supervisor/daemon/reconcile.py, machine_restart.py): "machine restarted at 03:12", with the
panic string of the newest kernel panic report written after the record's last update —
read from recorded reports in Apple's formats through the platform interface."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time

import pytest

from shared.exitcodes import FailureClass
from shared.run_record import Action
from supervisor.daemon.reconcile import reconcile
from tests.test_platform_readings import REPORTS, epoch, linux, mac
from tests.test_reconcile import left_training, next_supervisor

BOOTTIME = "{ sec = 1715656378, usec = 480012 } Tue May 14 03:12:58 2024\n"  # 03:12 UTC


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def last_update(keeper, iso: str):
    keeper.record = dataclasses.replace(keeper.record, updated=iso)
    return keeper


def test_a_restart_with_a_panic_report_names_the_time_and_the_panic(tmp_path, utc):
    run = left_training(tmp_path, boot="0ld-boot-0000")
    keeper = last_update(next_supervisor(run), "2024-05-14T03:05:00+00:00")
    platform = mac({"sysctl -n kern.boottime": BOOTTIME}, REPORTS)
    found = reconcile(keeper, run, this_boot="boot-time-1715656378", platform=platform)
    assert found is not None and found.machine is not None
    a = keeper.record.attempts[0]
    assert (a.classification, a.action) == (FailureClass.MACHINE_RESTARTED, Action.ABANDONED)
    assert a.detail.startswith("the machine restarted at 03:12 (boot id 0ld-boot… is now "
                               "boot-tim…); kernel panic (panic-full-2024-05-14-031158.0002.ips"
                               "): panic(cpu 4 caller 0xfffffe0028a2f6ac): AGX firmware panic")
    assert found.machine.boot_time == pytest.approx(1715656378.480012)
    assert keeper.record.totals.failures == 1  # a restart lost the attempt: a failure


def test_a_panic_written_before_the_last_record_belongs_to_an_earlier_restart(tmp_path, utc):
    run = left_training(tmp_path, boot="0ld-boot-0000")
    keeper = last_update(next_supervisor(run), "2024-05-14T03:20:00+00:00")
    platform = mac({"sysctl -n kern.boottime": BOOTTIME}, REPORTS)
    reconcile(keeper, run, this_boot="boot-time-1715656378", platform=platform)
    detail = keeper.record.attempts[0].detail
    assert "no kernel panic report after the last record" in detail and "AGX" not in detail


def test_linux_keeps_the_previous_boots_journal(tmp_path, utc):
    run = left_training(tmp_path, boot="0ld-boot-0000")
    keeper = last_update(next_supervisor(run), "2024-05-14T03:05:00+00:00")
    journal = "2024-05-14T03:11:50+0000 box kernel: Out of memory: Killed process 4343 (python)"
    platform = linux({"/proc/sys/kernel/random/boot_id": "new-boot-1111\n",
                      "/proc/stat": "btime 1715656378\n"},
                     {"journalctl -b -1 -n 15 --no-pager -o short-iso": journal + "\n"})
    found = reconcile(keeper, run, this_boot="new-boot-1111", platform=platform)
    assert found is not None and found.machine is not None
    assert found.machine.previous_log == journal
    assert keeper.record.attempts[0].detail.startswith("the machine restarted at 03:12")


def test_the_same_boot_is_no_restart(tmp_path):
    run = left_training(tmp_path, boot="same-boot")
    found = reconcile(next_supervisor(run), run, this_boot="same-boot", platform=mac())
    assert found is not None and found.machine is None
    assert next_supervisor(run).record.attempts[0].classification is None


def test_epoch_helper_is_utc():
    assert epoch("2024-05-14T03:12:58+00:00") == dt.datetime(
        2024, 5, 14, 3, 12, 58, tzinfo=dt.timezone.utc).timestamp()
