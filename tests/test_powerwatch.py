"""Battery, heat and the worker recycle in the supervisor loop (supervisor/daemon/powerwatch.py,
loop.py), replayed with the fakes of tests/test_loop.py and recorded `pmset` outputs injected
through the platform interface: a throttled stretch is logged from start to end; on battery
below pause_below_charge the worker is stopped (checkpoint) as a pause, not a failure, and
the next attempt waits for AC; a recycle point stops the worker as a planned restart."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import structlog
from structlog.testing import capture_logs

from shared.exitcodes import FailureClass
from shared.run_record import Action, Detection
from supervisor.daemon.platform_readings import Platform, Sources
from supervisor.daemon.powerwatch import PowerWatch
from supervisor.daemon.state import Begin, State
from tests.test_loop import beat, rig, send  # noqa: F401  (rig: the fixture)

POWER = Path(__file__).parent / "fixtures" / "power"
T0 = 1_715_640_000.0  # wall clock of the replay's start (epoch seconds)


class RecordedMac:
    """`pmset` as the test says it is now (the recorded outputs in tests/fixtures/power)."""

    def __init__(self) -> None:
        self.batt = (POWER / "pmset_batt_ac_charging.txt").read_text()
        self.therm = (POWER / "pmset_therm_nominal.txt").read_text()

    def run(self, argv):
        return {"pmset -g batt": self.batt, "pmset -g therm": self.therm}.get(" ".join(argv))

    def platform(self) -> Platform:
        return Platform(Sources("Darwin", self.run, lambda p: None, lambda d: [],
                                lambda p: None))


def watched(sup, clock, mac: RecordedMac) -> None:
    opts = dataclasses.replace(sup.opts, power_poll_interval=1.0, pause_below_charge=20)
    sup.power = PowerWatch(mac.platform(), opts, structlog.get_logger(),
                           wall=lambda: T0 + clock.now)


def test_heat_battery_pause_and_resume_on_ac(rig):  # noqa: F811
    sup, spawner, clock, pub = rig
    mac = RecordedMac()
    watched(sup, clock, mac)
    sup.dispatch(Begin())
    _, proc = spawner.started[0]
    send(pub, sup, beat(proc.pid, 3))
    assert sup.state is State.TRAINING
    with capture_logs() as logs:
        clock.now = 1.0
        sup._tick()  # on AC, nominal: nothing
        mac.therm = (POWER / "pmset_therm_throttled.txt").read_text()
        clock.now = 2.0
        send(pub, sup, beat(proc.pid, 4))
        mac.therm = (POWER / "pmset_therm_nominal.txt").read_text()
        clock.now = 5.0
        send(pub, sup, beat(proc.pid, 5))
    events = [(e["event"], e.get("detail"), e.get("throttled_s")) for e in logs
              if e["event"].startswith("thermal")]
    assert events == [("thermal_throttled", "CPU_Speed_Limit = 35", None),
                      ("thermal_nominal", "no thermal or performance limit recorded", 3.0)]
    assert proc.signals == []  # heat alone stops nothing

    mac.batt = (POWER / "pmset_batt_battery_95.txt").read_text()
    clock.now = 6.0
    send(pub, sup, beat(proc.pid, 6))
    assert sup.state is State.TRAINING  # on battery, but well charged
    mac.batt = (POWER / "pmset_batt_battery_18.txt").read_text()
    with capture_logs() as logs:
        clock.now = 7.0
        send(pub, sup, beat(proc.pid, 7))
    assert sup.state is State.STOPPING and proc.signals == [signal.SIGTERM, signal.SIGCONT]
    assert [e["event"] for e in logs if e["event"] == "power_pause"] == ["power_pause"]
    proc.returncode = 23  # the worker saved a checkpoint and exited
    sup._tick()
    a = sup.record.attempts[0]
    assert (a.classification, a.detected_by, a.action) == (
        FailureClass.BATTERY_PAUSE, Detection.POWER, Action.WAIT_FOR_POWER)
    assert a.detail.startswith("on battery at 18% (below pause_below_charge 20%")
    assert sup.record.record.totals.failures == 0
    for t in (8.0, 20.0, 60.0):  # still on battery: no restart, however long
        clock.now = t
        sup._tick()
        assert sup.state is State.BACKING_OFF and len(spawner.started) == 1
    mac.batt = (POWER / "pmset_batt_ac_not_charging.txt").read_text()
    with capture_logs() as logs:
        clock.now = 61.0
        sup._tick()
    assert sup.state is State.STARTING and len(spawner.started) == 2
    returned = [e for e in logs if e["event"] == "power_returned"]
    assert len(returned) == 1 and returned[0]["paused_s"] == 54.0


def test_a_worker_is_recycled_at_the_recycle_point(rig):  # noqa: F811
    sup, spawner, _, pub = rig
    sup.runner.policy.note_resource_limit(10)
    sup.runner.policy.note_resource_limit(10)  # recurred after a similar count: recycle at 8
    sup.dispatch(Begin())
    _, proc = spawner.started[0]
    send(pub, sup, beat(proc.pid, 7))
    assert sup.state is State.TRAINING and proc.signals == []
    send(pub, sup, beat(proc.pid, 8))
    assert sup.state is State.STOPPING and proc.signals == [signal.SIGTERM, signal.SIGCONT]
    proc.returncode = 23
    sup._tick()
    a = sup.record.attempts[0]
    assert (a.classification, a.detected_by, a.action) == (
        FailureClass.PLANNED_RESTART, Detection.RECYCLE, Action.PLANNED_RESTART)
    assert a.detail.startswith("recycling the worker after 8 steps, before Metal's resource "
                               "limit (it ended workers after 10, 10 steps)")
    sup._tick()
    assert sup.state is State.STARTING and len(spawner.started) == 2  # at once, no backoff
