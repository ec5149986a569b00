"""No worker outlives its supervisor by more than a few seconds, in any state
(supervisor/daemon/spawn.py's orphan guard): a real supervisor, the scripted fake worker
(tests/fake_worker.py), real SIGSTOP and SIGKILL.

The numbers (spawn.py's docstring): a worker that can act on SIGTERM — running, or stopped
with SIGSTOP (the guard sends SIGCONT) — saves and leaves within RESPONSIVE_S of the
supervisor's death (measured here: 0.1-0.4 s); one that ignores SIGTERM is SIGKILLed after
the guard's grace, min(supervisor.stop_timeout, 10 s): 3 s in these tests, so it is gone
within 3 s + SLACK_S.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.supervisor_support import (
    record,
    start_daemon,
    wait_for,
    worker_intervals,
    write_config,
)
from tests.test_policy_e2e import steps_of, worker_pid

RESPONSIVE_S = 5.0  # the promise for a worker that can save: "a few seconds"
GRACE_S = 3.0  # supervisor.stop_timeout in tests/supervisor_support.py FAST (< 10 s)
SLACK_S = 2.0
ENV = {"FAKE_STEP_SECONDS": "0.03", "FAKE_HEARTBEAT": "0.2"}


@pytest.fixture(autouse=True)
def no_injection(monkeypatch):
    monkeypatch.delenv("OVERNIGHT_INJECT", raising=False)


def gone(pid: int) -> bool:
    """The process has ended (a zombie waiting for init to reap it has ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, limit: float) -> float:
    """Seconds until `pid` has ended; fails after `limit` (and kills it: no test leaves one)."""
    t0 = time.monotonic()
    try:
        wait_for(lambda: gone(pid), timeout=limit, interval=0.02)
    except AssertionError:
        os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"worker {pid} outlived its supervisor by more than {limit} s") \
            from None
    return time.monotonic() - t0


def started(tmp_path: Path, inject: str = "") -> tuple[Path, object, int]:
    """A supervisor with a long run, its worker past step 5: (run dir, supervisor, worker)."""
    config = write_config(tmp_path, iters=100_000, save_every=100_000, inject=inject)
    run_dir = tmp_path / "run"
    sup = start_daemon(config, run_dir, ENV)
    pid = worker_pid(run_dir, 1)
    wait_for(lambda: max(steps_of(run_dir, 1), default=0) >= 5, timeout=60)
    return run_dir, sup, pid


def guards_of(*pids: int) -> list[int]:
    """Orphan guards (supervisor/daemon/orphan_guard.py) watching any of these workers."""
    wanted = {str(p) for p in pids}
    return [p.pid for p in psutil.process_iter(["cmdline"])
            if any(a.endswith("orphan_guard.py") for a in p.info["cmdline"] or [])
            and wanted & set(p.info["cmdline"] or [])]


def ends(run_dir: Path, pid: int) -> list[str]:
    """How the fake worker `pid` ended, from RUN_DIR/fake.log ("23": saved and left)."""
    return [line.split()[3] for line in (run_dir / "fake.log").read_text().splitlines()
            if line.startswith(f"end {pid} ")]


def kill_supervisor(sup) -> None:
    sup.kill()
    sup.wait(10)


def test_a_stopped_worker_leaves_within_seconds_of_a_killed_supervisor(tmp_path):
    """The issue: SIGSTOP the worker, SIGKILL the supervisor. The kernel's parent-death
    SIGTERM stays pending in a stopped process: before, the worker stayed forever. The
    guard sends SIGCONT + SIGTERM: it saves a checkpoint and leaves."""
    run_dir, sup, pid = started(tmp_path)
    try:
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED)
        kill_supervisor(sup)
        seconds = wait_gone(pid, RESPONSIVE_S)
    finally:
        sup.kill()
    print(f"stopped worker gone {seconds:.2f} s after its supervisor")
    assert ends(run_dir, pid) == ["23"]  # SIGTERM acted on: a checkpoint, then exit 23
    log = (run_dir / "logs" / "worker-1.log").read_text()
    assert f"the supervisor is gone: SIGCONT + SIGTERM to worker {pid}" in log
    assert list((run_dir / "checkpoints").glob("step-*"))


def test_a_running_worker_leaves_within_seconds_of_a_killed_supervisor(tmp_path):
    run_dir, sup, pid = started(tmp_path)
    try:
        [guard] = guards_of(pid)  # one per attempt, while it runs
        kill_supervisor(sup)
        seconds = wait_gone(pid, RESPONSIVE_S)
        wait_gone(guard, 2.0)  # its work done, the guard leaves too
    finally:
        sup.kill()
    print(f"running worker gone {seconds:.2f} s after its supervisor")
    assert ends(run_dir, pid) == ["23"]


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    """A worker stuck in a step (the fake's `stall`: it never looks at its SIGTERM flag) and
    stopped on top of it: SIGKILL to its group after the grace, not never."""
    run_dir, sup, pid = started(tmp_path, inject="stall@8")
    try:
        wait_for(lambda: max(steps_of(run_dir, 1)) >= 8)
        os.kill(pid, signal.SIGSTOP)
        kill_supervisor(sup)
        seconds = wait_gone(pid, GRACE_S + SLACK_S)
    finally:
        sup.kill()
    print(f"unresponsive worker gone {seconds:.2f} s after its supervisor")
    assert seconds >= GRACE_S - 0.5  # it was given the grace to save
    assert ends(run_dir, pid) == []  # killed: no end of its own


def test_the_guard_ends_with_its_attempt(tmp_path):
    """A guard per attempt, gone when the attempt is (nothing left behind by a run)."""
    config = write_config(tmp_path, iters=20, inject="crash@5")
    run_dir = tmp_path / "run"
    sup = start_daemon(config, run_dir, ENV)
    try:
        assert sup.wait(60) == 0
    finally:
        sup.kill()
    assert record(run_dir)["state"] == "finished"
    workers = [pid for pid, *_ in worker_intervals(run_dir)]
    assert len(workers) == 2
    assert guards_of(*workers) == []  # reaped by the supervisor, not left to init
    log = (run_dir / "logs" / "worker-1.log").read_text()
    assert "orphan guard" not in log  # told the worker was reaped: it signalled nothing
