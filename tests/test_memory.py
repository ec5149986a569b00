"""supervisor/memory.py and supervisor/watch.py: planned-restart and liveness decisions."""

from __future__ import annotations

import os

from shared.config import SupervisorOptions
from shared.protocol import Heartbeat, Phase, StepMetrics
from supervisor.daemon import memory, watch
from supervisor.daemon.memory import MemoryWatch, Sample

OPTS = SupervisorOptions(memory_limit_mb=0, memory_growth=0.5, memory_growth_samples=3,
                         memory_warmup_steps=10, heartbeat_timeout=120, startup_timeout=600,
                         stall_timeout=1800)


def s(step, mb, available=8000.0):
    return Sample(0.0, step, rss_mb=mb, mlx_mb=0.0, available_mb=available, total_mb=16000.0)


def test_a_slow_leak_triggers_a_planned_restart_after_sustained_growth():
    w = MemoryWatch(OPTS)
    readings = [(1, 50), (5, 400)]  # warm-up: ignored
    readings += [(10, 1000), (11, 1010), (12, 990)]  # baseline 990
    readings += [(20, 1600), (21, 1400), (22, 1600), (23, 1650), (24, 1700)]  # one dip
    reasons = [w.add(s(step, mb)) for step, mb in readings]
    assert reasons[:-1] == [None] * (len(readings) - 1)
    assert "grew from 990 MB to 1700 MB" in reasons[-1]
    assert w.peak_rss_mb == 1700 and w.min_available_mb == 8000


def test_memory_limit_and_low_system_memory():
    w = MemoryWatch(SupervisorOptions(memory_limit_mb=1000, memory_growth=0))
    assert w.add(s(1, 900)) is None
    assert "above memory_limit_mb 1000" in w.add(s(2, 1001))
    w = MemoryWatch(SupervisorOptions(min_available_mb=500, memory_growth=0))
    assert "below min_available_mb 500" in w.add(s(1, 100, available=400))


def test_sampling_a_real_process_and_a_gone_one():
    me = memory.sample(os.getpid(), 0.0, 1, 10.0)
    assert me is not None and me.rss_mb > 1 and me.total_mb > me.available_mb > 0
    assert memory.sample(2**22 + 12345, 0.0, 1, 0.0) is None


def hb(step, phase=Phase.TRAINING, attempt=1, pid=7):
    return Heartbeat(run_id="r", pid=pid, attempt=attempt, seq=1, time=0.0, phase=phase,
                     step=step, total_steps=100, last_step_time=0.0, active_mb=1.0,
                     peak_mb=1.0, rss_mb=1.0, dropped=0)


def test_startup_uses_the_longer_timeout_then_the_heartbeat_timeout():
    v = watch.AttemptView(attempt=1, pid=7, spawned_at=0.0, start_step=0)
    assert watch.check(v, OPTS, 599) is None
    assert watch.check(v, OPTS, 600)[0] == "hang"
    v.update(hb(0, Phase.LOADING), 10)
    assert watch.check(v, OPTS, 609) is None  # still loading: 600 s
    v.update(hb(1), 20)
    assert watch.check(v, OPTS, 139) is None
    assert watch.check(v, OPTS, 140) == ("hang", 120)


def test_heartbeats_without_steps_are_a_stall():
    v = watch.AttemptView(attempt=1, pid=7, spawned_at=0.0, start_step=0)
    v.update(hb(5), 10)
    for t in range(100, 1800, 100):
        v.update(hb(5), t)  # the heartbeat thread keeps beating, the step does not move
    assert watch.check(v, OPTS, 1809) is None
    kind, seconds = watch.check(v, OPTS, 1810)
    assert kind == "stall" and seconds == 1800
    v.update(hb(5, Phase.EVALUATING), 1811)  # a phase change counts as progress
    assert watch.check(v, OPTS, 1900) is None


def test_messages_of_other_attempts_are_ignored_and_metrics_count_tokens():
    v = watch.AttemptView(attempt=2, pid=7, spawned_at=0.0, start_step=10)
    assert not v.accepts(hb(11, attempt=1)) and not v.accepts(hb(11, attempt=2, pid=8))
    m = StepMetrics(run_id="r", attempt=2, step=11, time=0.0, loss=1.0, grad_norm=1.0, lr=1e-5,
                    tokens=400, tokens_per_sec=100.0, step_seconds=4.0, active_mb=5.0,
                    peak_mb=6.0, rss_mb=7.0)
    assert v.accepts(m) and v.update(m, 1.0)
    assert (v.step, v.tokens_per_sec, v.first_step_at) == (11, 100.0, 1.0)


def test_the_worker_tree_is_walked_again_every_30_s_not_every_sample(tmp_path):
    """psutil's children() reads every process's /proc entry: the worker's children are found
    again every 30 s (memory.py CHILDREN_EVERY), the ones known read in between; a child that
    exits stops counting at once."""
    import subprocess
    import sys
    import time as clock

    code = ("import subprocess, sys, time\n"
            "child = None\n"
            "for line in sys.stdin:\n"
            "    if line.startswith('spawn'):\n"
            "        child = subprocess.Popen([sys.executable, '-c',\n"
            "            'b = bytearray(200 * 2**20); import time; time.sleep(60)'])\n"
            "    elif child is not None:\n"
            "        child.kill(); child.wait()\n"
            "    print('ok', flush=True)\n")
    worker = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        alone = memory.sample(worker.pid, 1000.0, 1, 0.0)
        worker.stdin.write("spawn\n")
        worker.stdin.flush()
        assert worker.stdout.readline() == "ok\n"
        clock.sleep(1.0)  # the child allocates its 200 MB
        soon = memory.sample(worker.pid, 1029.0, 1, 0.0)  # 29 s later: the tree as it was
        later = memory.sample(worker.pid, 1030.0, 1, 0.0)  # 30 s: found again
        assert alone is not None and soon is not None and later is not None
        assert soon.rss_mb < alone.rss_mb + 50 and later.rss_mb > alone.rss_mb + 150
        worker.stdin.write("kill\n")
        worker.stdin.flush()
        assert worker.stdout.readline() == "ok\n"
        gone = memory.sample(worker.pid, 1031.0, 1, 0.0)
        assert gone is not None and gone.rss_mb < alone.rss_mb + 50
    finally:
        worker.kill()
        worker.wait()
