"""supervisor/daemon/policy.py's budgets in real supervised runs (the scripted fake worker,
tests/fake_worker.py): kills from outside inside one checkpoint interval, and the high-water
mark a restarted supervisor judges progress by."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.supervisor_support import record, start_daemon, wait_for, write_config

SLOW = {"FAKE_STEP_SECONDS": "0.03", "FAKE_HEARTBEAT": "0.2"}


@pytest.fixture(autouse=True)
def no_injection(monkeypatch):
    monkeypatch.delenv("OVERNIGHT_INJECT", raising=False)


def steps_of(run_dir: Path, attempt: int) -> list[int]:
    """The steps attempt N wrote to logs/metrics.jsonl (the worker's per-step file)."""
    path = run_dir / "logs" / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written
        if m.get("attempt") == attempt:
            out.append(m["step"])
    return out


def worker_pid(run_dir: Path, attempt: int) -> int:
    """The pid of attempt N's fake worker (RUN_DIR/fake.log: "start PID TIME attempt=N")."""
    def find() -> int | None:
        path = run_dir / "fake.log"
        for line in path.read_text().splitlines() if path.exists() else []:
            kind, pid, _, *rest = line.split()
            if kind == "start" and rest == [f"attempt={attempt}"]:
                return int(pid)
        return None
    return int(wait_for(find, timeout=60))  # a loaded machine: the start can take seconds


def kill_at(run_dir: Path, attempt: int, step: int) -> int:
    """SIGKILL attempt N's worker once it has reached `step`; returns the step it was at."""
    pid = worker_pid(run_dir, attempt)
    wait_for(lambda: max(steps_of(run_dir, attempt), default=0) >= step, timeout=30,
             interval=0.005)
    os.kill(pid, signal.SIGKILL)
    return max(steps_of(run_dir, attempt))


def test_two_kills_from_outside_inside_one_checkpoint_interval_do_not_end_the_run(tmp_path):
    """The issue's night: a kill at step ~20, the restart (from scratch: the first checkpoint
    is at 35) killed again at ~8. Before: "the same failure twice without progress ...
    deterministic", gave up. Now: two kills at two steps are no repeat, and a kill from
    outside is no evidence; the run finishes."""
    config = write_config(tmp_path, iters=40, save_every=35)
    run_dir = tmp_path / "run"
    sup = start_daemon(config, run_dir, SLOW)
    try:
        first = kill_at(run_dir, 1, 20)
        second = kill_at(run_dir, 2, 8)
        assert sup.wait(60) == 0
    finally:
        sup.kill()
    rec = record(run_dir)
    assert rec["state"] == "finished", rec["reason"]
    attempts = rec["attempts"]
    assert [a["classification"] for a in attempts] == ["crash", "crash", "completed"]
    assert [a["signal_name"] for a in attempts[:2]] == ["SIGKILL", "SIGKILL"]
    assert [a["action"] for a in attempts[:2]] == ["restart", "restart"]
    # both inside the first checkpoint interval: each restart began from scratch
    assert [a["resumed_from"] for a in attempts[:3]] == [None, None, None]
    # the end steps come from the worker's metrics, the second below the high-water mark
    assert attempts[0]["end_step"] == first >= 20
    assert attempts[1]["end_step"] == second < first
    assert rec["final_step"] == rec["high_water_step"] == 40


def test_a_restarted_supervisor_judges_progress_by_the_steps_its_predecessor_saw(tmp_path):
    """Supervisor and worker die together at step ~20, before any checkpoint (run.json's
    high-water mark is still 0). The next supervisor reads the abandoned attempt's last step
    from metrics.jsonl: an attempt killed at step ~8 after it is no progress."""
    config = write_config(tmp_path, iters=40, save_every=35)
    run_dir = tmp_path / "run"
    sup = start_daemon(config, run_dir, SLOW)
    try:
        pid = worker_pid(run_dir, 1)
        wait_for(lambda: max(steps_of(run_dir, 1), default=0) >= 20, timeout=30)
        sup.send_signal(signal.SIGSTOP)  # it must not see its worker die
        os.kill(pid, signal.SIGKILL)
        sup.kill()
        sup.wait(10)
        reached = max(steps_of(run_dir, 1))
        assert record(run_dir)["high_water_step"] == 0
        again = start_daemon(config, run_dir, SLOW)
        killed = kill_at(run_dir, 2, 8)
        wait_for(lambda: len(record(run_dir)["attempts"]) >= 3, timeout=30)
        rec = record(run_dir)
        assert killed < reached
        assert rec["high_water_step"] >= reached  # not `killed`: that was no progress
        assert again.wait(60) == 0
    finally:
        sup.kill()
        if "again" in locals():
            again.kill()
    rec = record(run_dir)
    assert rec["state"] == "finished", rec["reason"]
    assert [a["action"] for a in rec["attempts"]] == ["abandoned", "restart", "finish"]
