"""The supervisor with the real worker on a tiny model: real MLX training, real ZeroMQ, real
signals. Few runs that share work: one run goes through every failure class in turn.

The measured detection and restart times are printed (run with -s to see them) and are the
numbers quoted in docs/architecture.md.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.conftest import subprocess_env, write_config
from tests.supervisor_support import ROOT, events, record, wait_for

FAST = {
    "heartbeat_timeout": 3.0, "startup_timeout": 60.0, "stall_timeout": 4.0,
    "stop_timeout": 10.0, "backoff_initial": 0.2, "backoff_max": 1.0, "sample_interval": 1.0,
    "caffeinate": False,
}
EVERY_FAILURE = ("crash@5,oom@12,gpu_watchdog@17,checkpoint_crash@20,spike@24,nan@33,"
                 "hang@37,stall@42")
EXPECTED = ["crash", "oom", "gpu_watchdog", "crash", "grad_spike", "non_finite", "hang",
            "stall", "completed"]


def supervise(config: Path, run_dir: Path, inject: str = "") -> subprocess.Popen[str]:
    env = subprocess_env(**({"OVERNIGHT_INJECT": inject} if inject else {}))
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "run", str(config), "--run-dir", str(run_dir)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_every_failure_class_is_recovered_and_the_run_finishes(tmp_path, tiny_model, corpus):
    config = write_config(tmp_path / "e2e.yaml", tiny_model, corpus, iters=50,
                          supervisor=FAST, grad_spike={"patience": 2})
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    sup = supervise(config, run_dir, EVERY_FAILURE)
    _, err = sup.communicate(timeout=300)
    elapsed = time.monotonic() - t0
    assert sup.returncode == 0, err[-3000:]
    rec = record(run_dir)
    attempts = rec["attempts"]
    assert [a["classification"] for a in attempts] == EXPECTED, [
        (a["classification"], a["detail"]) for a in attempts]
    assert rec["state"] == "finished" and rec["final_step"] == 50 == rec["total_steps"]
    assert err.strip().splitlines()[-1] == "overnight run: finished: all steps done"

    by = {a["classification"]: a for a in reversed(attempts[:-1])}  # the first of each class
    assert by["crash"]["detected_by"] == "exit" and by["crash"]["signal_name"] == "SIGABRT"
    assert "kIOGPUCommandBufferCallbackErrorOutOfMemory" in by["oom"]["stderr_tail"]
    assert attempts[1]["settings_changed"] == {"batch_size": [4, 2],
                                               "grad_accumulation_steps": [1, 2]}
    assert "display" in by["gpu_watchdog"]["action_reason"]
    assert attempts[3]["signal_name"] == "SIGKILL"  # killed mid-checkpoint
    spike, nan = by["grad_spike"], by["non_finite"]
    assert spike["action"] == nan["action"] == "rollback" and rec["rollbacks"] == 2
    assert attempts[5]["lr_scale"] == 0.5 and attempts[6]["lr_scale"] == 0.25
    # Each rollback skips the offending data only: the spike window's 2 batches (patience
    # 2), the NaN's 1 batch; the healthy batches between the rollback checkpoint and them
    # are trained again (before: everything from the checkpoint through them was skipped).
    assert (attempts[5]["skip_steps"], attempts[6]["skip_steps"]) == (2, 1)
    window = [spike["bad_data"]["position"] - 1, spike["bad_data"]["position"]]
    bad = nan["bad_data"]["position"]
    for number, skipped in ((6, window), (7, [bad])):
        trained = _positions(run_dir, number)
        assert trained[0] < skipped[0]  # some healthy batch before them was trained again
        assert sorted(set(range(trained[0], trained[-1] + 1)) - set(trained)) == skipped
    assert rec["overrides"] == {"batch_size": 2, "grad_accumulation_steps": 2,
                                "lr_scale": 0.25, "skip_positions": [*window, bad]}
    assert by["hang"]["detected_by"] == "heartbeat_timeout"
    assert by["stall"]["detected_by"] == "stall_timeout"
    assert rec["overrides"]["batch_size"] == 2  # the OOM change was kept by later attempts
    assert all(a["settings"]["batch_size"] == 2 for a in attempts[2:])
    # the checkpoint left by the spike was set aside, not deleted
    assert any(q["reason"].startswith("set aside by a rollback") for q in rec["quarantined"])
    # each resumed attempt trusted the supervisor's validation (its manifest hash): a
    # checkpoint is validated once per start
    resumed = [a for a in attempts if a["resumed_from"] is not None]
    worker_checks = [e for e in map(json.loads, (run_dir / "logs" / "worker.jsonl")
                                    .read_text().splitlines()) if e["event"] ==
                     "checkpoint_validated"]
    assert resumed and len(worker_checks) == len(resumed)
    assert all(e["by_supervisor"] for e in worker_checks)

    crash_latency = by["crash"]["detection_latency_s"]
    hang_latency = by["hang"]["detection_latency_s"]
    restarts = [a["downtime_s"] for a in attempts[1:] if a["downtime_s"] is not None]
    print(f"\nMEASURED crash_detection_s={crash_latency} hang_detection_s={hang_latency} "
          f"(heartbeat_timeout 3) restart_downtime_s min={min(restarts)} "
          f"max={max(restarts)} (backoff 0.2..1 s included) "
          f"time_to_first_step_s={[a['time_to_first_step_s'] for a in attempts]} "
          f"whole_run_s={elapsed:.1f}")
    assert crash_latency < 0.5
    assert 3.0 <= hang_latency < 4.0


def test_bad_data_gives_up_at_once_with_one_clear_line(tmp_path, tiny_model):
    config = write_config(tmp_path / "bad.yaml", tiny_model, tmp_path / "no-such-data",
                          supervisor=FAST)
    sup = supervise(config, tmp_path / "run")
    _, err = sup.communicate(timeout=120)
    assert sup.returncode == 0
    rec = record(tmp_path / "run")
    assert rec["state"] == "gave_up" and len(rec["attempts"]) == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("overnight run: gave_up: bad config or data:") and "no-such-data" in (
        last), last


def test_a_killed_supervisor_is_restarted_and_resumes_without_a_second_worker(
        tmp_path, tiny_model, corpus):
    config = write_config(tmp_path / "kill.yaml", tiny_model, corpus, iters=60,
                          supervisor=FAST)
    run_dir = tmp_path / "run"
    first = supervise(config, run_dir)
    wait_for(lambda: (run_dir / "run.json").exists() and record(run_dir)["final_step"] >= 15,
             timeout=120)
    old_worker = record(run_dir)["worker"]["pid"]
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = supervise(config, run_dir)
    wait_for(lambda: len(record(run_dir)["attempts"]) >= 2, timeout=120)
    assert not _alive(old_worker), "the old worker was still running when the new one started"
    _, err = second.communicate(timeout=180)
    assert second.returncode == 0, err[-3000:]
    rec = record(run_dir)
    assert rec["state"] == "finished" and rec["final_step"] == 60
    assert [a.get("action") for a in rec["attempts"]] == ["abandoned", "finish"]
    assert rec["attempts"][1]["resumed_from"]["step"] >= 10
    assert rec["supervisor"]["starts"] == 2
    # the old worker was stopped by its parent-death signal, or found as an orphan
    assert len(events(run_dir, "orphan_found")) <= 1
    lines = (run_dir / "logs" / "worker.jsonl").read_text().splitlines()
    assert old_worker in {json.loads(line).get("pid") for line in lines if line.strip()}


def _positions(run_dir: Path, attempt: int) -> list[int]:
    """The data positions attempt `attempt` trained, step by step (logs/metrics.jsonl)."""
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [m["data_position"] for m in map(json.loads, lines) if m["attempt"] == attempt]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
