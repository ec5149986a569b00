"""worker/signals.py: the parent watch asks the loop to stop when the supervisor is gone,
and ends the process itself when the loop does not stop within OVERNIGHT_ORPHAN_GRACE
(the worker's own backstop behind its orphan guard, supervisor/daemon/spawn.py). Real
processes: a parent that is SIGKILLed, a child that keeps running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from tests.supervisor_support import ROOT, wait_for

# The "worker": installs the Stopper, then either never looks at its flags (stuck in a
# step) or stops at the next check, as the training loop does between steps.
CHILD = """
import sys, time
from types import SimpleNamespace
from worker.signals import Stopper
controls = SimpleNamespace(stop_requested=False, stop_reason="", checkpoint_requested=False)
Stopper(controls).install()
print("ready", flush=True)
while True:
    time.sleep(0.05)
    if sys.argv[1] == "responsive" and controls.stop_requested:
        print("stopping:", controls.stop_reason, flush=True)
        sys.exit(23)
"""
# The "supervisor": starts the worker with its pid in the environment, reports it, waits.
PARENT = """
import os, subprocess, sys
env = {**os.environ, "OVERNIGHT_PARENT_PID": str(os.getpid()),
       "OVERNIGHT_ORPHAN_GRACE": sys.argv[2]}
child = subprocess.Popen([sys.executable, "-c", sys.argv[3], sys.argv[1]], env=env,
                         stdout=open(sys.argv[4], "w"), stderr=subprocess.STDOUT)
print(child.pid, flush=True)
child.wait()
"""


def orphan(tmp_path, mode: str, grace: float) -> tuple[int, float, str]:
    """Start PARENT -> CHILD, SIGKILL the parent once the child is ready; returns the
    child's pid, seconds from the kill until it had ended, and its output."""
    out = tmp_path / "child.out"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, mode, str(grace), CHILD, str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        text=True)
    pid = int(parent.stdout.readline())
    wait_for(lambda: out.exists() and "ready" in out.read_text())
    parent.kill()
    parent.wait()
    t0 = time.monotonic()

    def ended() -> bool:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    try:
        wait_for(ended, timeout=grace + 5, interval=0.02)
    finally:
        if not ended():
            os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic() - t0, out.read_text()


def test_a_stuck_worker_ends_itself_after_the_grace_once_its_supervisor_is_gone(tmp_path):
    """Before: the flag was set and nothing else happened; a worker stuck in a step (its
    guard gone too) lived on. Now: gone within the poll (1 s) + the grace (0.5 s here)."""
    _, seconds, output = orphan(tmp_path, "stuck", 0.5)
    assert 0.5 <= seconds <= 0.5 + 1.0 + 1.0, seconds
    assert "is gone and this worker did not stop within 0.5 s" in output


def test_a_responsive_worker_stops_as_asked_before_the_grace(tmp_path):
    _, seconds, output = orphan(tmp_path, "responsive", 30)
    assert seconds < 1.0 + 1.0, seconds
    assert "stopping: supervisor went away" in output
    assert "is gone" not in output
