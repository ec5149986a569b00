"""The opt-in GPU watchdog mitigation (supervisor/daemon/gpu_watchdog.py): off by default;
on, the worker's environment gets AGX_RELAX_CDM_CTXSTORE_TIMEOUT=1 and the display is put to
sleep once at start with `pmset displaysleepnow` (never `caffeinate -d`)."""

from __future__ import annotations

import dataclasses

import structlog
from structlog.testing import capture_logs

from shared.config import SupervisorOptions
from supervisor.daemon import gpu_watchdog
from supervisor.daemon.platform_readings import Platform, Sources

ON = dataclasses.replace(SupervisorOptions(), gpu_watchdog_mitigation=True)


def recording_mac(calls: list[list[str]]) -> Platform:
    def run(argv):
        calls.append(list(argv))
        return ""
    return Platform(Sources("Darwin", run, lambda p: None, lambda d: [], lambda p: None))


def test_off_by_default_nothing_changes():
    calls: list[list[str]] = []
    assert gpu_watchdog.worker_environment(SupervisorOptions()) == {}
    gpu_watchdog.at_start(SupervisorOptions(), recording_mac(calls), structlog.get_logger())
    assert calls == []


def test_on_the_worker_gets_the_driver_switch_and_the_display_sleeps_once():
    calls: list[list[str]] = []
    assert gpu_watchdog.worker_environment(ON) == {"AGX_RELAX_CDM_CTXSTORE_TIMEOUT": "1"}
    with capture_logs() as logs:
        gpu_watchdog.at_start(ON, recording_mac(calls), structlog.get_logger())
    assert calls == [["pmset", "displaysleepnow"]]
    assert logs[0]["event"] == "gpu_watchdog_mitigation" and logs[0]["display_sleep"] is True
    assert logs[0]["cooldown_s"] == 300.0


def test_on_linux_there_is_no_display_to_sleep():
    calls: list[list[str]] = []

    def run(argv):
        calls.append(list(argv))
        return ""
    linux = Platform(Sources("Linux", run, lambda p: None, lambda d: [], lambda p: None))
    assert linux.display_sleep_now() is False and calls == []
