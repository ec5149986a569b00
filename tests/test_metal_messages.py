"""The real texts of Metal's failures (tests/fixtures/metal/, each with its public source):
each gets its own class from supervisor/daemon/classify.py and the action its policy names;
Metal's resource limit (a buffer count) is restarted unchanged and, when it recurs after a
similar number of steps, answered by recycling the worker before that point; the GPU
watchdog's opt-in mitigation waits a cool-down; a battery pause is not a failure."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from shared.config import SupervisorOptions
from shared.exitcodes import FailureClass
from supervisor.daemon.classify import ExitFacts, classify
from supervisor.daemon.policy import Outcome, Policy, Settings
from supervisor.daemon.state import StopReason, Verdict

F = FailureClass
FIXTURES = Path(__file__).parent / "fixtures" / "metal"
BASE = Settings(batch_size=4, grad_accumulation_steps=2, grad_checkpoint=False)
OPTS = SupervisorOptions(backoff_initial=5, backoff_max=300, max_failures=5,
                         failure_window=1800)


def recorded(path: Path) -> tuple[dict[str, str], str]:
    """The `# key: value` header of a fixture and the recorded output after it."""
    header, body = {}, []
    for line in path.read_text().splitlines():
        if line.startswith("# ") and ": " in line and not body:
            key, _, value = line[2:].partition(": ")
            header[key] = value
        else:
            body.append(line)
    return header, "\n".join(body) + "\n"


FILES = sorted(FIXTURES.glob("*.txt"))


def test_every_metal_failure_has_a_recorded_text():
    assert {recorded(p)[0]["class"] for p in FILES} >= {
        "metal_resource_limit", "oom", "gpu_watchdog", "crash"}
    assert all(recorded(p)[0]["source"].startswith("https://github.com/") for p in FILES)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_a_recorded_metal_message_gets_its_class_and_action(path):
    header, stderr = recorded(path)
    c = classify(ExitFacts(int(header["returncode"]), stderr_tail=stderr))
    assert c.failure.value == header["class"], c.detail
    d = Policy(OPTS, random.Random(0)).decide(
        Outcome(c.failure, c.detail, 0, 120, signal=c.signal), BASE, now=0)
    assert (d.verdict, d.action) == (Verdict.RESTART, header["action"])
    if c.failure is F.OOM:  # "maximum allowed buffer size" is memory: a smaller micro-batch
        assert d.settings == Settings(2, 4, False)
    else:
        assert d.settings == BASE


def test_the_resource_limit_is_not_memory_and_a_smaller_batch_is_not_tried():
    _, stderr = recorded(FIXTURES / "resource_limit_abort.txt")
    c = classify(ExitFacts(-6, stderr_tail=stderr, memory_mb=990, memory_limit_mb=1000))
    assert c.failure is F.METAL_RESOURCE_LIMIT and "not memory" in c.detail


def resource_limit(p: Policy, start: int, end: int, now: float = 0.0):
    return p.decide(Outcome(F.METAL_RESOURCE_LIMIT, "Resource limit (499000) exceeded", start,
                            end, signal=6), BASE, now)


def test_a_recurring_resource_limit_recycles_the_worker_before_that_point():
    p = Policy(OPTS, random.Random(0))
    first = resource_limit(p, 0, 200)
    assert first.action == "restart" and first.recycle_after == 0
    second = resource_limit(p, 150, 340, now=60)  # 190 steps: similar to 200
    assert second.action == "restart" and second.recycle_after == 152  # 80 % of 190
    assert "recycled" in second.reason
    # the recycle point holds for what comes next: a planned restart keeps it
    planned = p.decide(Outcome(F.PLANNED_RESTART, "recycling", 340, 492), BASE, 120)
    assert planned.recycle_after == 152
    # it came before the recycle point after all: the point moves down
    third = resource_limit(p, 492, 592, now=180)
    assert third.recycle_after == 80


def test_resource_limits_at_dissimilar_step_counts_do_not_recycle():
    p = Policy(OPTS, random.Random(0))
    resource_limit(p, 0, 400)
    assert resource_limit(p, 350, 450, now=60).recycle_after == 0  # 100 vs 400 steps


def test_the_same_resource_limit_at_the_same_step_is_not_deterministic():
    """A count that grows with the worker's age ends it at the same step again after a
    restart from the same checkpoint: that is no reason to give up."""
    p = Policy(OPTS, random.Random(0))
    resource_limit(p, 100, 300)
    again = resource_limit(p, 100, 300, now=60)
    assert again.verdict is Verdict.RESTART and again.recycle_after == 160


def test_a_restarted_supervisor_keeps_the_recycle_point():
    p = Policy(OPTS, random.Random(0))
    p.note_resource_limit(200)
    p.note_resource_limit(210)
    assert p.recycle_after == 160


def test_gpu_watchdog_mitigation_waits_the_cooldown_and_is_off_by_default():
    assert SupervisorOptions().gpu_watchdog_mitigation is False
    off = Policy(OPTS, random.Random(0)).decide(Outcome(F.GPU_WATCHDOG, "x", 0, 50), BASE, 0)
    assert off.delay < 10
    on = Policy(dataclasses.replace(OPTS, gpu_watchdog_mitigation=True), random.Random(0))
    d = on.decide(Outcome(F.GPU_WATCHDOG, "x", 0, 50), BASE, 0)
    assert d.delay == 300 and "cooling down 300 s" in d.reason


def test_a_battery_pause_waits_for_ac_and_counts_against_nothing():
    p = Policy(dataclasses.replace(OPTS, max_failures=1), random.Random(0))
    for n in range(3):
        d = p.decide(Outcome(F.BATTERY_PAUSE, "on battery at 18%", 10 * n, 10 * n + 5), BASE, n)
        assert (d.verdict, d.action, d.counted, d.delay) == (Verdict.RESTART, "wait_for_power",
                                                             False, 0.0)
    assert not F.BATTERY_PAUSE.is_failure


@pytest.mark.parametrize("reason,cls", [(StopReason.POWER, F.BATTERY_PAUSE),
                                        (StopReason.RECYCLE, F.PLANNED_RESTART)])
def test_planned_stops_are_classified_by_their_reason(reason, cls):
    assert classify(ExitFacts(23, stop_reason=reason)).failure is cls
